// Package ui is how kpfree talks to people and to programs: status lines
// (spinners on a terminal, plain lines otherwise) and logs on stderr; tables
// or exactly one JSON document on stdout.
package ui

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/pterm/pterm"
	"golang.org/x/term"
)

// Format is the shape of the result written on stdout.
type Format string

const (
	Table Format = "table"
	JSON  Format = "json"
)

// ParseFormat accepts "table" or "json".
func ParseFormat(s string) (Format, error) {
	switch Format(s) {
	case Table, JSON:
		return Format(s), nil
	}
	return "", fmt.Errorf("--output %q: must be table or json", s)
}

// UI writes results to Out and everything else to Err.
type UI struct {
	Out     io.Writer
	Err     io.Writer
	Format  Format
	Verbose int
	// Interactive enables spinners; true only when Err is a terminal.
	Interactive bool

	mu sync.Mutex
}

// New returns a UI on the process's stdout and stderr.
func New(format Format, verbose int) *UI {
	return &UI{
		Out:         os.Stdout,
		Err:         os.Stderr,
		Format:      format,
		Verbose:     verbose,
		Interactive: term.IsTerminal(int(os.Stderr.Fd())) && os.Getenv("CI") == "",
	}
}

// Discard returns a UI that writes nothing (for tests).
func Discard() *UI { return &UI{Out: io.Discard, Err: io.Discard, Format: Table} }

// Status is one step in progress.
type Status struct {
	ui      *UI
	title   string
	start   time.Time
	spinner *pterm.SpinnerPrinter
}

// Start announces a step and returns its status line.
func (u *UI) Start(title string) *Status {
	s := &Status{ui: u, title: title, start: time.Now()}
	if u.Interactive {
		sp, err := pterm.DefaultSpinner.WithWriter(u.Err).WithRemoveWhenDone(false).Start(title)
		if err == nil {
			s.spinner = sp
			return s
		}
	}
	u.printf("--> %s\n", title)
	return s
}

// End closes the status line: ok, or the error.
func (s *Status) End(err error) {
	d := time.Since(s.start).Round(10 * time.Millisecond)
	if err != nil {
		msg := fmt.Sprintf("%s (%s): %v", s.title, d, err)
		if s.spinner != nil {
			s.spinner.Fail(msg)
			return
		}
		s.ui.printf(" FAIL %s\n", msg)
		return
	}
	msg := fmt.Sprintf("%s (%s)", s.title, d)
	if s.spinner != nil {
		s.spinner.Success(msg)
		return
	}
	s.ui.printf("  ok  %s\n", msg)
}

// Skip closes the status line as skipped, with the reason.
func (s *Status) Skip(reason string) {
	msg := fmt.Sprintf("%s: skipped, %s", s.title, reason)
	if s.spinner != nil {
		s.spinner.Info(msg)
		return
	}
	s.ui.printf(" skip %s\n", msg)
}

// Infof logs a line on stderr.
func (u *UI) Infof(format string, a ...any) { u.printf(format+"\n", a...) }

// Warnf logs a warning on stderr.
func (u *UI) Warnf(format string, a ...any) { u.printf("warning: "+format+"\n", a...) }

// Debugf logs on stderr at -v and above.
func (u *UI) Debugf(format string, a ...any) {
	if u.Verbose > 0 {
		u.printf(format+"\n", a...)
	}
}

// HostLine logs one line of a host's output, prefixed with the host name, at -v.
func (u *UI) HostLine(host, line string) {
	if u.Verbose > 0 {
		u.printf("[%s] %s\n", host, strings.TrimRight(line, "\n"))
	}
}

func (u *UI) printf(format string, a ...any) {
	u.mu.Lock()
	defer u.mu.Unlock()
	fmt.Fprintf(u.Err, format, a...)
}

// WriteJSON writes v as the one JSON document on stdout.
func (u *UI) WriteJSON(v any) error {
	enc := json.NewEncoder(u.Out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// WriteTable writes an aligned table on stdout.
func (u *UI) WriteTable(header []string, rows [][]string) error {
	return WriteTable(u.Out, header, rows)
}

// WriteTable writes an aligned plain-text table (no colours, stable for golden tests).
func WriteTable(w io.Writer, header []string, rows [][]string) error {
	widths := make([]int, len(header))
	all := append([][]string{header}, rows...)
	for _, r := range all {
		for i, c := range r {
			if i < len(widths) && len(c) > widths[i] {
				widths[i] = len(c)
			}
		}
	}
	var b strings.Builder
	for _, r := range all {
		for i, c := range r {
			if i == len(r)-1 {
				b.WriteString(c)
				break
			}
			fmt.Fprintf(&b, "%-*s  ", widths[i], c)
		}
		b.WriteString("\n")
	}
	_, err := io.WriteString(w, b.String())
	return err
}
