// etcd for the tests' API server, from its Go module (etcd's own go.mod carries replace directives, so
// it cannot be `go install`ed directly).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
