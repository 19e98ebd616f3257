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
		Flags:                globalFlags(),
		Before:               checkGlobalFlags,
		OnUsageError:         func(c *cli.Context, err error, _ bool) error { return usageError{err} },
		Commands: withGlobalFlags(
			versionCommand(),
			preflightCommand(),
			initCommand(),
			verifyCommand(),
			installCommand(),
			uninstallCommand(),
			labCommand(),
		),
		ExitErrHandler: func(*cli.Context, error) {}, // exit codes are decided in run
	}
}

// globalFlags are accepted before and after the command name
// (kpfree -o json preflight, kpfree preflight -o json).
func globalFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "nodes", Aliases: []string{"n"}, Usage: "hosts inventory `FILE` (hosts.yaml)", EnvVars: []string{"KPFREE_NODES"}},
		&cli.StringFlag{Name: "output", Aliases: []string{"o"}, Value: "table", Usage: "result format on stdout: table or json"},
		&cli.IntFlag{Name: "concurrency", Value: 10, Usage: "hosts worked on at once"},
		&cli.DurationFlag{Name: "timeout", Value: 30 * time.Minute, Usage: "give up on the whole command after this long"},
		&cli.BoolFlag{Name: "dry-run", Usage: "print what would be done on each host, change nothing"},
		&cli.BoolFlag{Name: "verbose", Aliases: []string{"v"}, Count: new(int), Usage: "more output on stderr (repeat for more)"},
	}
}

// withGlobalFlags gives every command (and subcommand) the global flags and
// makes its usage errors exit 2.
func withGlobalFlags(cmds ...*cli.Command) []*cli.Command {
	for _, c := range cmds {
		if len(c.Subcommands) > 0 {
			withGlobalFlags(c.Subcommands...)
		} else {
			// A command's own flag wins over a global one of the same name
			// (lab up --nodes N counts nodes; elsewhere --nodes is a file).
			for _, g := range globalFlags() {
				if !hasFlag(c.Flags, g.Names()[0]) {
					c.Flags = append(c.Flags, g)
				}
			}
			before := c.Before
			c.Before = func(ctx *cli.Context) error {
				if err := checkGlobalFlags(ctx); err != nil {
					return err
				}
				if before != nil {
					return before(ctx)
				}
				return nil
			}
		}
		c.OnUsageError = func(_ *cli.Context, err error, _ bool) error { return usageError{err} }
	}
	return cmds
}

func hasFlag(flags []cli.Flag, name string) bool {
	for _, f := range flags {
		for _, n := range f.Names() {
			if n == name {
				return true
			}
		}
	}
	return false
}

func checkGlobalFlags(c *cli.Context) error {
	if _, err := ui.ParseFormat(globalString(c, "output")); err != nil {
		return usageError{err}
	}
	if n := flagContext(c, "concurrency").Int("concurrency"); n < 1 {
		return usagef("--concurrency must be at least 1, got %d", n)
	}
	if flagContext(c, "timeout").Duration("timeout") <= 0 {
		return usagef("--timeout must be positive")
	}
	return nil
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
	f, _ := ui.ParseFormat(globalString(c, "output"))
	v := flagContext(c, "verbose").Count("verbose")
	return &env{UI: ui.New(f, v), Format: f, Concurrency: flagContext(c, "concurrency").Int("concurrency"),
		DryRun: flagContext(c, "dry-run").Bool("dry-run"), Verbose: v}
}

// flagContext returns the nearest context in which a global flag was given:
// the command's own (kpfree preflight -o json) or the app's (kpfree -o json
// preflight). Without it, the command's default would hide the app's value.
func flagContext(c *cli.Context, name string) *cli.Context {
	for _, x := range c.Lineage() {
		for _, n := range x.LocalFlagNames() {
			if n == name {
				return x
			}
		}
	}
	return c
}

func globalString(c *cli.Context, name string) string { return flagContext(c, name).String(name) }

// withTimeout bounds a command by --timeout.
func withTimeout(c *cli.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(c.Context, flagContext(c, "timeout").Duration("timeout"))
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
