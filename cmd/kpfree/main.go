// Command kpfree builds and operates Kubernetes clusters that run without
// kube-proxy. This file holds only flags and wiring; the work is done in the
// packages it calls.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/kpfree/kpfree/internal/ui"
	"github.com/kpfree/kpfree/internal/version"
)

// Exit codes, documented in docs/cli.md.
const (
	exitOK     = 0
	exitFailed = 1 // a check or step failed
	exitUsage  = 2 // bad flags or a bad inventory
)

// usageError marks an error as the user's input being wrong (exit 2).
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usagef(format string, a ...any) error { return usageError{fmt.Errorf(format, a...)} }

// failedError marks a run whose checks or steps failed and were already
// reported (exit 1, no extra message).
type failedError struct{ msg string }

func (e failedError) Error() string { return e.msg }

func main() {
	os.Exit(run(os.Args))
}

func run(args []string) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	app := newApp()
	err := app.RunContext(ctx, args)
	if err == nil {
		return exitOK
	}
	var fe failedError
	if errors.As(err, &fe) {
		if fe.msg != "" {
			fmt.Fprintln(os.Stderr, "kpfree:", fe.msg)
		}
		return exitFailed
	}
	fmt.Fprintln(os.Stderr, "kpfree:", err)
	var ue usageError
	if errors.As(err, &ue) {
		return exitUsage
	}
	return exitFailed
}

func newApp() *cli.App {
	return &cli.App{
		Name:                 "kpfree",
		Usage:                "run Kubernetes without kube-proxy",
		Version:              version.Get(),
		HideVersion:          true,
		EnableBashCompletion: true,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "nodes", Aliases: []string{"n"}, Usage: "hosts inventory `FILE` (hosts.yaml)", EnvVars: []string{"KPFREE_NODES"}},
			&cli.StringFlag{Name: "output", Aliases: []string{"o"}, Value: "table", Usage: "result format on stdout: table or json"},
			&cli.IntFlag{Name: "concurrency", Value: 10, Usage: "hosts worked on at once"},
			&cli.DurationFlag{Name: "timeout", Value: 30 * time.Minute, Usage: "give up on the whole command after this long"},
			&cli.BoolFlag{Name: "dry-run", Usage: "print what would be done on each host, change nothing"},
			&cli.BoolFlag{Name: "verbose", Aliases: []string{"v"}, Count: new(int), Usage: "more output on stderr (repeat for more)"},
		},
		Before: func(c *cli.Context) error {
			if _, err := ui.ParseFormat(c.String("output")); err != nil {
				return usageError{err}
			}
			if c.Int("concurrency") < 1 {
				return usagef("--concurrency must be at least 1, got %d", c.Int("concurrency"))
			}
			if c.Duration("timeout") <= 0 {
				return usagef("--timeout must be positive")
			}
			return nil
		},
		OnUsageError: func(c *cli.Context, err error, _ bool) error { return usageError{err} },
		Commands: []*cli.Command{
			versionCommand(),
			preflightCommand(),
		},
		ExitErrHandler: func(*cli.Context, error) {}, // exit codes are decided in run
	}
}

// env is what every command gets from the global flags.
type env struct {
	UI          *ui.UI
	Format      ui.Format
	Concurrency int
	DryRun      bool
	Verbose     int
}

func newEnv(c *cli.Context) *env {
	f, _ := ui.ParseFormat(c.String("output"))
	v := c.Count("verbose")
	return &env{UI: ui.New(f, v), Format: f, Concurrency: c.Int("concurrency"), DryRun: c.Bool("dry-run"), Verbose: v}
}

// withTimeout bounds a command by --timeout.
func withTimeout(c *cli.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(c.Context, c.Duration("timeout"))
}

func versionCommand() *cli.Command {
	return &cli.Command{
		Name:  "version",
		Usage: "print kpfree's version",
		Action: func(c *cli.Context) error {
			e := newEnv(c)
			if e.Format == ui.JSON {
				return e.UI.WriteJSON(map[string]string{"version": version.Get()})
			}
			fmt.Fprintln(e.UI.Out, "kpfree", version.Get())
			return nil
		},
	}
}
