// Command prepare readies a Kubernetes lab for kpfree init (see
// test/e2e/labinit) and prints the flags to add to `kpfree init`, one per
// line:
//
//	go run ./test/e2e/labinit/prepare -lab-dir /var/lib/kpfree-lab -out DIR
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/kpfree/kpfree/internal/lab"
	"github.com/kpfree/kpfree/test/e2e/labinit"
)

func main() {
	labDir := flag.String("lab-dir", "", "the lab's state directory (default: $KPFREE_LAB_DIR or "+lab.DefaultDir+")")
	out := flag.String("out", "", "directory for the files (required)")
	flag.Parse()
	if *out == "" {
		fmt.Fprintln(os.Stderr, "prepare: -out is required")
		os.Exit(2)
	}
	s, err := lab.Load(*labDir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "prepare:", err)
		os.Exit(1)
	}
	if !s.Kubernetes {
		fmt.Fprintln(os.Stderr, "prepare: the lab's nodes are not Kubernetes nodes: kpfree lab up --kubernetes")
		os.Exit(1)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	flags, err := labinit.Prepare(ctx, s, *out)
	if err != nil {
		fmt.Fprintln(os.Stderr, "prepare:", err)
		os.Exit(1)
	}
	for _, f := range flags {
		fmt.Println(f)
	}
}
