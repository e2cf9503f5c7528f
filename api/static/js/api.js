// The API as the dashboard calls it: the signed-in key (this tab's sessionStorage, never a cookie or a URL)
// sent as the bearer header, problem+json answers as ApiError, SSE read from fetch() (EventSource can't send
// headers), downloads fetched as blobs (a link can't carry the header either), uploads with progress.

export const API = "/api/v1";
const KEY = "torchyard.apiKey";

export const key = {
  get: () => window.sessionStorage.getItem(KEY),
  set: (value) => window.sessionStorage.setItem(KEY, value),
  clear: () => window.sessionStorage.removeItem(KEY),
};

/** An answer that isn't a success: its status and problem (title, detail, errors: [{path, message}]). */
export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

function headers(extra = {}) {
  const value = key.get();
  return value ? { Authorization: `Bearer ${value}`, ...extra } : { ...extra };
}

async function failure(response) {
  let problem;
  try {
    problem = await response.json();
  } catch {
    problem = { title: response.statusText };
  }
  if (response.status === 401) window.dispatchEvent(new CustomEvent("torchyard:unauthorized"));
  return new ApiError(response.status, problem);
}

/** The JSON answer of ``path`` (under /api/v1), null for 204; throws ApiError. ``body`` is sent as is. */
export async function api(path, { method = "GET", body, json, signal } = {}) {
  const extra = json !== undefined || body !== undefined ? { "Content-Type": "application/json" } : {};
  const response = await fetch(API + path, {
    method, signal, headers: headers(extra), body: json !== undefined ? JSON.stringify(json) : body,
  });
  if (!response.ok) throw await failure(response);
  return response.status === 204 ? null : response.json();
}

/** Save the file at ``path`` as the browser's download; resolves to its size in bytes. */
export async function download(path, fallbackName) {
  const response = await fetch(API + path, { headers: headers() });
  if (!response.ok) throw await failure(response);
  const blob = await response.blob();
  const named = /filename="([^"]+)"/.exec(response.headers.get("Content-Disposition") || "");
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = named ? named[1] : fallbackName;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
  return blob.size;
}

/**
 * POST a multipart form with XMLHttpRequest, whose upload reports progress (fetch's doesn't): ``onProgress``
 * hears the fraction sent, 1 once every byte is (the server then still reads the file before it answers).
 */
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", API + path);
    for (const [name, value] of Object.entries(headers())) request.setRequestHeader(name, value);
    request.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    });
    request.upload.addEventListener("load", () => onProgress(1));
    request.addEventListener("load", () => {
      let body = {};
      try {
        body = JSON.parse(request.responseText);
      } catch { /* an empty or non-JSON answer: its status still says */ }
      if (request.status >= 200 && request.status < 300) return resolve(body);
      if (request.status === 401) window.dispatchEvent(new CustomEvent("torchyard:unauthorized"));
      reject(new ApiError(request.status, body));
    });
    request.addEventListener("error", () => reject(new ApiError(0, { title: "the upload failed (network)" })));
    request.send(form);
  });
}

/**
 * The events of a text/event-stream answer at ``path``, as {event, id, data} (data parsed as JSON), until the
 * server ends it or ``signal`` aborts. ``lastEventId`` resumes a stream (the Last-Event-ID header).
 */
export async function* events(path, { lastEventId, signal } = {}) {
  const extra = { Accept: "text/event-stream" };
  if (lastEventId !== undefined && lastEventId !== null) extra["Last-Event-ID"] = String(lastEventId);
  const response = await fetch(API + path, { headers: headers(extra), signal });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const event = parseEvent(block);
        if (event) yield event;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function parseEvent(block) {
  const event = { event: "message", id: null, data: "" };
  let hasData = false;
  for (const line of block.split("\n")) {
    if (line === "" || line.startsWith(":")) continue; // a comment: the server's keep-alive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event.event = value;
    else if (field === "id") event.id = value;
    else if (field === "data") {
      event.data += (hasData ? "\n" : "") + value;
      hasData = true;
    }
  }
  if (!hasData) return null;
  event.data = JSON.parse(event.data);
  return event;
}
