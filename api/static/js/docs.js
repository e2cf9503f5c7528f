// /docs: the API's OpenAPI document in the vendored Swagger UI. "Try it out" sends the key the dashboard
// signed in with (this tab's sessionStorage) unless Swagger UI's own Authorize dialog set one.
"use strict";
window.addEventListener("DOMContentLoaded", () => {
  window.SwaggerUIBundle({
    url: "/api/v1/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [window.SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    requestInterceptor: (request) => {
      const key = window.sessionStorage.getItem("torchyard.apiKey");
      if (key && !request.headers.Authorization) request.headers.Authorization = `Bearer ${key}`;
      return request;
    },
  });
});
