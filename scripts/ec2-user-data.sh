#!/usr/bin/env bash
# EC2 user-data for a GPU training worker (Ubuntu 22.04/24.04 Deep Learning AMI or any image with an NVIDIA driver).
# It clones the project, installs it from requirements.lock with TensorFlow's CUDA wheels in place of tensorflow-cpu,
# pulls the DVC-tracked data it can already see, and starts `prefect worker start --pool gpu` as a systemd service.
#
# Fill in the five settings below (or template them from your launch configuration). Credentials: give the instance
# an IAM role (instance profile) — no keys on disk. The role needs, on the DVC remote's bucket/prefix:
#   s3:ListBucket (on the bucket), s3:GetObject and s3:PutObject (on the prefix),
# and, when MLflow's artifacts live in S3 and are not proxied by the tracking server, the same on that prefix.
# The security groups must let the instance reach the Prefect API and the MLflow tracking server.
set -euo pipefail

REPO_URL=${REPO_URL:-https://github.com/YOUR-ORG/electron-microscope-assistant.git}
REPO_REF=${REPO_REF:-main}
PREFECT_API_URL=${PREFECT_API_URL:-http://prefect.internal:4200/api}
MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-http://mlflow.internal:5000}
WORK_POOL=${WORK_POOL:-gpu}

APP_USER=ubuntu
CHECKOUT=/opt/emassist

apt-get update -y
apt-get install -y --no-install-recommends git python3.11 python3.11-venv
install -d -o "$APP_USER" -g "$APP_USER" "$CHECKOUT"

sudo -u "$APP_USER" -H bash -euo pipefail <<SETUP
cd "$CHECKOUT"
[ -d .git ] || git clone "$REPO_URL" .
git fetch --all --tags && git checkout "$REPO_REF"
PYTHON=python3.11 bash scripts/setup.sh                      # .venv exactly as locked (CPU TensorFlow)
# GPU extras: the same TensorFlow release with its CUDA libraries instead of tensorflow-cpu.
.venv/bin/uv pip uninstall --python .venv/bin/python tensorflow-cpu
.venv/bin/uv pip install --python .venv/bin/python "tensorflow[and-cuda]==2.21.0"
.venv/bin/python -c "import tensorflow as tf; print('GPUs:', tf.config.list_physical_devices('GPU'))"
# Warm the DVC cache with what the checked-out dvc.lock names (each training pulls its own inputs again).
.venv/bin/dvc pull ingest split augment || echo "dvc pull: nothing to pull yet (the pipeline pushes before training)"
SETUP

cat > /etc/systemd/system/prefect-worker.service <<UNIT
[Unit]
Description=Prefect worker for the emassist '$WORK_POOL' work pool
After=network-online.target
Wants=network-online.target

[Service]
User=$APP_USER
WorkingDirectory=$CHECKOUT
Environment=PATH=$CHECKOUT/.venv/bin:/usr/local/bin:/usr/bin:/bin
Environment=EMASSIST_REPO=$CHECKOUT
Environment=PREFECT_API_URL=$PREFECT_API_URL
Environment=MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI
Environment=TF_CPP_MIN_LOG_LEVEL=2
ExecStart=$CHECKOUT/.venv/bin/prefect worker start --pool $WORK_POOL
# The worker stops cleanly on SIGINT (it ignores SIGTERM for a long while).
KillSignal=SIGINT
TimeoutStopSec=60
Restart=always
RestartSec=10

[Install]
WantedBy=multi-user.target
UNIT

systemctl daemon-reload
systemctl enable --now prefect-worker.service
