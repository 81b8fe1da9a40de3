"""Connector execution: the catalog (ConnectorFramework), IntegrationManager and the
generic HTTP path (GenericExecutor), each call run inside NodeSandbox."""

from corral.executors._backfill import BACKFILLS, Addition, backfill
from corral.executors._catalog import (
    SHIPPED_CATALOG,
    CatalogError,
    CatalogProblem,
    Connector,
    ConnectorFramework,
    Operation,
    app_folders,
    check_catalog,
    load_connector,
    normalise_app_id,
)
from corral.executors._generic import GENERIC_SOURCE, generic_request
from corral.executors._integration import (
    IntegrationManager,
    IntegrationResult,
    credential_secrets,
)
from corral.executors._openapi import ImportReport, import_openapi
from corral.executors._schema import (
    ConnectorDefinition,
    Problem,
    json_schema,
    missing_credentials,
    problems,
)

__all__ = [
    "BACKFILLS",
    "GENERIC_SOURCE",
    "SHIPPED_CATALOG",
    "Addition",
    "CatalogError",
    "CatalogProblem",
    "Connector",
    "ConnectorDefinition",
    "ConnectorFramework",
    "ImportReport",
    "IntegrationManager",
    "IntegrationResult",
    "Operation",
    "Problem",
    "app_folders",
    "backfill",
    "check_catalog",
    "credential_secrets",
    "generic_request",
    "import_openapi",
    "json_schema",
    "load_connector",
    "missing_credentials",
    "normalise_app_id",
    "problems",
]
