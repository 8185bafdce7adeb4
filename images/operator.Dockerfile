# syntax=docker/dockerfile:1.7
# The operator image: `kubetune operator` (kopf), and `kubetune console` (the chart's
# console.enabled). Slim: neither imports torch or transformers (tests/test_images.py imports
# them with those blocked), so kubetune is installed without its training dependencies, plus
# exactly what the operator and the console import. Build from the
# repository root:
#   docker build -f images/operator.Dockerfile -t ghcr.io/kubetune/kubetune-operator:0.1.0 .
ARG PYTHON_VERSION=3.12
FROM python:${PYTHON_VERSION}-slim AS build
ARG KOPF_VERSION=1.45.2
ARG KUBERNETES_VERSION=36.0.3
ARG PYDANTIC_VERSION=2.14.3
ARG PYYAML_VERSION=6.0.3
ARG BOTO3_VERSION=1.44.5
ARG NUMPY_VERSION=2.4.6
ARG TQDM_VERSION=4.70.1
ARG FASTAPI_VERSION=0.165.0
ARG UVICORN_VERSION=0.55.0
ARG JINJA2_VERSION=3.1.6
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/kubetune
ENV PATH=/opt/kubetune/bin:$PATH
COPY pyproject.toml setup.py README.md /src/
COPY images/constraints.txt /src/images/constraints.txt
COPY trainer /src/trainer
COPY operator /src/operator
# The constraints pin the ML stack: none of it belongs here, and the constraint keeps it that way
# at the tested versions should anything pull part of it in.
RUN pip install -c /src/images/constraints.txt --no-deps /src \
    && pip install -c /src/images/constraints.txt "kopf==${KOPF_VERSION}" "kubernetes==${KUBERNETES_VERSION}" \
        "pydantic==${PYDANTIC_VERSION}" "pyyaml==${PYYAML_VERSION}" "boto3==${BOTO3_VERSION}" \
        "numpy==${NUMPY_VERSION}" "tqdm==${TQDM_VERSION}" \
        "fastapi==${FASTAPI_VERSION}" "uvicorn==${UVICORN_VERSION}" "jinja2==${JINJA2_VERSION}" \
    && python -c "import kubetune.operator.handlers, kubetune.operator.console.app" \
    && kubetune operator --help >/dev/null && kubetune console --help >/dev/null

FROM python:${PYTHON_VERSION}-slim
RUN groupadd --gid 1000 kubetune && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp kubetune
COPY --from=build /opt/kubetune /opt/kubetune
ENV PATH=/opt/kubetune/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp
USER 1000:1000
EXPOSE 8080 9443
ENTRYPOINT ["kubetune"]
CMD ["operator", "--all-namespaces", "--standalone", "--liveness=http://0.0.0.0:8080/healthz"]
