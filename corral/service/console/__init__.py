"""The web console of `corral api` (DESIGN §10): runs, capabilities, health, playground.

Its page and assets hold no data and load without the token (`OPEN_PATHS`); every piece
of data comes from the token-protected endpoints."""

from corral.service.console._router import OPEN_PATHS, router

__all__ = ["OPEN_PATHS", "router"]
