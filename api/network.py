"""A job's network as a table: each layer's type, output shape and parameters, worked out from its spec and
the shape of its data with models.shapes (no torch), the same walk the engine builds the network with."""

from __future__ import annotations

from flask import Blueprint
from sqlalchemy import select

from api.auth import owned, require_user
from api.db import get_session
from api.errors import ApiError
from api.schemas import API_PREFIX, LayerOut, NetworkOut, json_response
from api.submit import dataset_shape
from models.catalog import SKLEARN_DATASETS, DataShape
from models.shapes import describe_data, infer_shapes
from models.spec import JobSpec
from models.tables import Dataset, Job

bp = Blueprint("network", __name__, url_prefix=f"{API_PREFIX}/jobs")
bp.before_request(require_user)


@bp.get("/<job_id>/network")
def network(job_id: str):
    """The job's layers with the output shape (one sample, no batch) and parameter count of each."""
    session = get_session()
    job = owned(session, Job, job_id, "job")
    spec = JobSpec.model_validate(job.spec)  # stored as validated, with its dataset's target named
    shape = _data_shape(spec, job.user_id)
    data = describe_data(shape, spec.task, spec.data.image_shape)
    report = infer_shapes(spec, data.input_shape, data.n_outputs)
    layers = [LayerOut(index=i, type=layer.type, output_shape=list(layer.output_shape), parameters=layer.parameters)
              for i, layer in enumerate(report.layers)]
    return json_response(NetworkOut(input_shape=list(data.input_shape), n_outputs=data.n_outputs, layers=layers,
                                    total_parameters=report.total_parameters))


def _data_shape(spec: JobSpec, user_id: str) -> DataShape:
    if spec.data.source == "sklearn":
        return SKLEARN_DATASETS[spec.data.name].shape(spec.data.params)
    dataset = get_session().scalar(select(Dataset).where(Dataset.id == spec.data.dataset_id,
                                                         Dataset.user_id == user_id))
    if dataset is None:  # deleted once the job had finished: its shape went with it
        raise ApiError(404, "No network table", f"the job's dataset {spec.data.dataset_id} was deleted, and with "
                       "it the shape the network's table is worked out from", kind="no-network")
    return dataset_shape(dataset, spec.data.target)[1]
