# nanorad inference service (serve.py) on CPU. A research demo, not a medical device.
#   docker build -t nanorad-serve .
#   docker run --rm -p 8000:8000 -v "$PWD/out:/models:ro" -v "$PWD/data:/data:ro" nanorad-serve \
#       --classifier=/models/quickstart/best.pt --clip=/models/clip_phantom/ckpt.pt --index=/data/phantom --split=test \
#       --gpt=/models/gpt_report_from_image/ckpt.pt
#   open http://127.0.0.1:8000/
# Checkpoints (and the prepared index folder) are mounted read-only, never baked into the image. A classifier's
# thresholds are chosen on its validation split when the folder it was trained on (its meta data_dir) is mounted at
# the same path; otherwise 0.5, and /v1/models says so.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=4

WORKDIR /app
# CPU-only torch wheels first (the default index would pull the CUDA build, ~2 GB more)
COPY requirements.txt requirements-serve.txt ./
RUN pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu \
 && pip install -r requirements.txt -r requirements-serve.txt

COPY *.py serve.html ./
COPY config ./config

RUN useradd --create-home --uid 10001 nanorad
USER nanorad

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"

ENTRYPOINT ["python", "serve.py", "--host=0.0.0.0", "--port=8000"]
CMD ["--classifier=/models/best.pt"]
