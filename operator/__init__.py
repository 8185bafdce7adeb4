"""kubetune.operator: the kopf operator that runs training specs on Kubernetes."""
