// Command pause is the pod sandbox process of the lab's registry.k8s.io/pause image: it holds
// the pod's namespaces open and does nothing else. It blocks until SIGINT or SIGTERM and then
// exits 0; as PID 1 of a PID namespace it also reaps the zombies reparented to it. `-v` prints
// the version. Built static (CGO_ENABLED=0) by test/images, which embeds this file.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

const version = "3.10.1-kpfree"

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-v" {
		fmt.Println("pause.go version", version)
		return
	}
	if len(os.Args) > 1 {
		fmt.Fprintln(os.Stderr, "usage: pause [-v]")
		os.Exit(2)
	}
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	if os.Getpid() == 1 {
		reap() // children that exited before Notify
	} else {
		fmt.Fprintln(os.Stderr, "pause: warning: not PID 1, will not reap zombies")
	}
	for s := range sigs {
		if s != syscall.SIGCHLD {
			fmt.Fprintf(os.Stderr, "pause: %v, exiting\n", s)
			os.Exit(0)
		}
		if os.Getpid() == 1 {
			reap()
		}
	}
}

// reap collects every exited child without blocking.
func reap() {
	for {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
		if err == syscall.EINTR {
			continue
		}
		if pid <= 0 || err != nil {
			return
		}
	}
}
