# The engine as a container: `mdb-realtime serve` on 0.0.0.0:8000 for the apps in /app/manifests.
# docker-compose.yml runs it next to a MongoDB replica set; set MONGODB_URI when running it alone.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MDB_REALTIME_DATA_DIR=/var/lib/mdb-realtime

WORKDIR /app

# The package first: a change to the manifests alone does not reinstall it.
COPY pyproject.toml README.md ./
COPY engine ./engine
RUN pip install . && rm -rf build ./*.egg-info

COPY manifests ./manifests

RUN useradd --system --uid 10001 --home-dir /var/lib/mdb-realtime --create-home realtime
USER realtime

EXPOSE 8000

# Healthy once MongoDB answers and every change stream runs (GET /readyz).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]

CMD ["mdb-realtime", "serve", "--host", "0.0.0.0", "--port", "8000", "--manifests", "/app/manifests"]
