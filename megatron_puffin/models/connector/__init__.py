"""Meta queries, the two bidirectional connector encoders and the projections into the DiT's conditioning."""
from megatron_puffin.models.connector.config import ConnectorConfig, gelu_tanh
from megatron_puffin.models.connector.connector_layer_specs import (
    get_connector_layer_local_spec,
    get_connector_layer_spec,
    get_connector_layer_with_transformer_engine_spec,
)
from megatron_puffin.models.connector.model import ConnectorEncoder, QueryConditioner, build_query_conditioner

__all__ = [
    "ConnectorConfig",
    "ConnectorEncoder",
    "QueryConditioner",
    "build_query_conditioner",
    "gelu_tanh",
    "get_connector_layer_local_spec",
    "get_connector_layer_spec",
    "get_connector_layer_with_transformer_engine_spec",
]
