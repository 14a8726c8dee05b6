// kube-apiserver for the tests (envtest-style: no kubelet, no controllers), from k8s.io/kubernetes'
// Go module. That module requires its staging modules at v0.0.0 (replaced inside its own repository),
// so this wrapper names each at its published v0.37.x.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() { os.Exit(cli.Run(app.NewAPIServerCommand())) }
