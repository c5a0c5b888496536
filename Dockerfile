# cj-streams: one image for every role (cj, lps, reaper, all); the role is the command's argument.
FROM python:3.11-slim

# PROMETHEUS_DISABLE_CREATED_SERIES: prometheus_client drops the `*_created` series it
# adds beside every counter and histogram (twice the series, of no use to rate()).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PROMETHEUS_DISABLE_CREATED_SERIES=True

WORKDIR /app
COPY pyproject.toml README.md ./
COPY events ./events
COPY streams ./streams
COPY projections ./projections
COPY cj ./cj
COPY lps ./lps
COPY app ./app
COPY tools ./tools
COPY web ./web
# The s3 extra: the archive store may be an S3 (or compatible) bucket. /archive is the default
# archive directory (a volume in compose.yaml), owned by the user the workers run as.
RUN pip install "./[s3]" \
    && groupadd --gid 10001 cjs \
    && useradd --create-home --uid 10001 --gid 10001 cjs \
    && mkdir /archive \
    && chown 10001:10001 /archive

# Numeric, so that the runtime (and Kubernetes' runAsNonRoot) can tell it is not root
# without reading the image's /etc/passwd.
USER 10001:10001
EXPOSE 9100
# `cjs dashboard --host 0.0.0.0 --port 8080` (compose's dashboard service)
EXPOSE 8080
# SIGTERM drains in-flight work; compose gives it stop_grace_period to do so.
STOPSIGNAL SIGTERM
ENTRYPOINT ["cjs"]
CMD ["worker", "all", "--metrics-port", "9100"]
