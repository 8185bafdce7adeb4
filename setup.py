"""Maps the repository's top-level folders to packages under the `kubetune` namespace.

pyproject.toml holds all metadata; this file exists only because the folder -> package mapping
(trainer/ -> kubetune.trainer, operator/ -> kubetune.operator) must list every subpackage.
"""

from setuptools import find_packages, setup

FOLDERS = {"trainer": "kubetune.trainer", "operator": "kubetune.operator"}

packages: list[str] = []
package_dir: dict[str, str] = {}
for folder, package in FOLDERS.items():
    package_dir[package] = folder
    packages.append(package)
    packages.extend(f"{package}.{sub}" for sub in find_packages(folder))

setup(packages=packages, package_dir=package_dir)
