"""HTTP routes of the job API, one router per resource; handlers only call ``JobService``."""

from services.api.routes.jobs import router as jobs_router
from services.api.routes.reports import router as reports_router
from services.api.routes.system import health_router, metrics_router

__all__ = ["health_router", "jobs_router", "metrics_router", "reports_router"]
