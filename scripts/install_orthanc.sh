#!/usr/bin/env bash
# Installs what the DICOM tests need when missing: Orthanc with its DICOMweb plugin and dicom3tools (dciodvfy).
set -euo pipefail
missing=()
command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
$sudo apt-get update
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${missing[@]}"
