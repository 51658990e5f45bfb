FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY infra infra
COPY streams streams
COPY alerts alerts
COPY models models
RUN pip install --no-cache-dir torch==2.13.0 \
 && pip install --no-cache-dir . \
 && useradd --system --create-home --uid 10001 artwatch
# The worker needs no privileges; its data folder (Faust's state) is its own.
USER artwatch
ENV ARTWATCH_DATA_DIR=/home/artwatch/var
# Metrics must be reachable from Prometheus in the compose network.
ENV ARTWATCH_WORKER__METRICS_BIND=0.0.0.0
EXPOSE 9464
CMD ["artwatch", "worker"]
