# One image for the consumer, the trainer and the demo producer (the command picks the role).
FROM python:3.11.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 SEG_METRICS_HOST=0.0.0.0
RUN useradd --create-home --uid 10001 app
WORKDIR /app
COPY pyproject.toml README.md ./
COPY segmentation ./segmentation
COPY consumer ./consumer
COPY trainer ./trainer
COPY demo ./demo
COPY bench ./bench
COPY quality ./quality
RUN pip install --no-cache-dir '.[report]'
USER app
EXPOSE 9100
CMD ["python", "-m", "consumer"]
