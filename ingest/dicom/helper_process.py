"""``python -m ingest.dicom.helper_process``: one listener helper process, started by the
primary listener (:mod:`ingest.dicom.processes`) to serve associations on the same port."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

from core.settings import get_settings
from ingest.dicom.listener import Listener
from ingest.dicom.processes import die_with_parent


def main() -> None:
    parser = argparse.ArgumentParser(description="a DICOM listener helper process")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, default=None)
    args = parser.parse_args()
    die_with_parent()
    settings = get_settings().model_copy(
        update={"dicom_port": args.port, "dicom_listener_processes": 1}
    )
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    listener = Listener(settings, publisher=None, reuse_port=True)
    listener.start()
    if args.ready_fd is not None:
        os.write(args.ready_fd, b"1")
        os.close(args.ready_fd)
    while not stop.wait(0.5):
        if os.getppid() != args.parent:  # the primary is gone (PDEATHSIG is the fast path)
            break
    listener.stop()


if __name__ == "__main__":
    main()
