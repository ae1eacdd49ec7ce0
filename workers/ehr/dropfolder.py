"""The scheduled scan of the EHR drop folder (celery beat, ``MEDBATCH_EHR_DROP_CRON``)."""

from __future__ import annotations

from core.settings import get_settings
from ingest.ehr.dropfolder import scan_drop_folder
from workers.celery_app import TASK_EHR_SCAN, app
from workers.dispatch import publish


@app.task(name=TASK_EHR_SCAN)
def scan_drop_folder_task() -> list[dict[str, object]]:
    return [o.__dict__ for o in scan_drop_folder(get_settings(), publish)]
