"""Connector execution: the catalog (ConnectorFramework), IntegrationManager and the
generic HTTP path (GenericExecutor), each call run inside NodeSandbox."""

from corral.executors._catalog import (
    SHIPPED_CATALOG,
    CatalogError,
    Connector,
    ConnectorFramework,
    Operation,
    load_connector,
    normalise_app_id,
)
from corral.executors._generic import GENERIC_SOURCE, generic_request
from corral.executors._integration import (
    IntegrationManager,
    IntegrationResult,
    credential_secrets,
)

__all__ = [
    "GENERIC_SOURCE",
    "SHIPPED_CATALOG",
    "CatalogError",
    "Connector",
    "ConnectorFramework",
    "IntegrationManager",
    "IntegrationResult",
    "Operation",
    "credential_secrets",
    "generic_request",
    "load_connector",
    "normalise_app_id",
]
