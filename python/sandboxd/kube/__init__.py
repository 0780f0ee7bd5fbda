"""sandboxd on Kubernetes: ``sandboxd node`` (a machine's sandboxes as a Node, the virtual-kubelet
pattern) and ``sandboxd serve --backend kubernetes`` (E2B's API over Pods). See docs/kubernetes.md."""
