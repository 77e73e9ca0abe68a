#!/usr/bin/env bash
# Open the demo's exported report in headless Chromium with the network cut off and check
# that every chart shows (see scripts/check_report_offline.py for how).
#   scripts/check_report_offline.sh [outputs/report/report.html] [--keep DIR]
# Needs: make demo (for the report) and Chromium (Debian: apt-get install -y chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" scripts/check_report_offline.py "$@"
