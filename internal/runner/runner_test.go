package runner

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// rec is a recording step: it appends what happened to a shared log.
type rec struct {
	name     string
	log      *[]string
	fail     error
	rbFail   error
	skip     bool
	noRB     bool
	dryRunOK bool
}

func (s *rec) Title() string { return s.name }
func (s *rec) Run(context.Context) error {
	*s.log = append(*s.log, "run "+s.name)
	return s.fail
}
func (s *rec) Skip(context.Context) (string, bool, error) {
	return "already done", s.skip, nil
}
func (s *rec) DryRun(context.Context) error {
	*s.log = append(*s.log, "dry "+s.name)
	return nil
}

type rbStep struct{ *rec }

func (s rbStep) Rollback(context.Context) error {
	*s.log = append(*s.log, "rollback "+s.name)
	return s.rbFail
}

func statuses(r Report) []Status {
	var out []Status
	for _, s := range r.Steps {
		out = append(out, s.Status)
	}
	return out
}

func TestRunAllOK(t *testing.T) {
	var log []string
	r := &Runner{}
	rep, err := r.Run(context.Background(), rbStep{&rec{name: "a", log: &log}}, &rec{name: "b", log: &log})
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"run a", "run b"}, log); diff != "" {
		t.Fatal(diff)
	}
	if !rep.OK || !rep.Changed() {
		t.Fatalf("report %+v", rep)
	}
}

func TestFailureRollsBackNewestFirstIncludingFailedStep(t *testing.T) {
	var log []string
	boom := errors.New("boom")
	steps := []Step{
		rbStep{&rec{name: "a", log: &log}},
		&rec{name: "b", log: &log}, // no rollback
		rbStep{&rec{name: "c", log: &log}},
		rbStep{&rec{name: "d", log: &log, fail: boom}},
		rbStep{&rec{name: "e", log: &log}},
	}
	rep, err := (&Runner{}).Run(context.Background(), steps...)
	var se *StepError
	if !errors.As(err, &se) || se.Step != "d" || !errors.Is(err, boom) || se.RollbackErr != nil {
		t.Fatalf("err = %v", err)
	}
	want := []string{"run a", "run b", "run c", "run d", "rollback d", "rollback c", "rollback a"}
	if diff := cmp.Diff(want, log); diff != "" {
		t.Fatal(diff)
	}
	if diff := cmp.Diff([]Status{RolledBack, OK, RolledBack, Failed, NotRun}, statuses(rep)); diff != "" {
		t.Fatal(diff)
	}
	if rep.OK {
		t.Fatal("report says ok")
	}
}

func TestRollbackFailureIsReported(t *testing.T) {
	var log []string
	steps := []Step{
		rbStep{&rec{name: "a", log: &log, rbFail: errors.New("cannot undo")}},
		&rec{name: "b", log: &log, fail: errors.New("boom")},
	}
	rep, err := (&Runner{}).Run(context.Background(), steps...)
	if err == nil || !strings.Contains(err.Error(), "cannot undo") || !strings.Contains(err.Error(), "boom") {
		t.Fatalf("err = %v", err)
	}
	if rep.Steps[0].Status != RollbackFailed || rep.Steps[0].RollbackError == "" {
		t.Fatalf("step a: %+v", rep.Steps[0])
	}
}

func TestSkipAndNoRollback(t *testing.T) {
	var log []string
	steps := []Step{
		rbStep{&rec{name: "a", log: &log, skip: true}},
		rbStep{&rec{name: "b", log: &log}},
		&rec{name: "c", log: &log, fail: errors.New("boom")},
	}
	rep, err := (&Runner{NoRollback: true}).Run(context.Background(), steps...)
	if err == nil {
		t.Fatal("want error")
	}
	if diff := cmp.Diff([]string{"run b", "run c"}, log); diff != "" {
		t.Fatal(diff)
	}
	if diff := cmp.Diff([]Status{Skipped, OK, Failed}, statuses(rep)); diff != "" {
		t.Fatal(diff)
	}
}

func TestDryRunRunsNothing(t *testing.T) {
	var log []string
	steps := []Step{rbStep{&rec{name: "a", log: &log}}, Func{Name: "f", Fn: func(context.Context) error {
		log = append(log, "run f")
		return nil
	}}}
	rep, err := (&Runner{DryRun: true}).Run(context.Background(), steps...)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"dry a"}, log); diff != "" {
		t.Fatal(diff)
	}
	if rep.Changed() || !rep.DryRun {
		t.Fatalf("report %+v", rep)
	}
}

func TestAllSkippedIsUnchanged(t *testing.T) {
	var log []string
	rep, err := (&Runner{}).Run(context.Background(), &rec{name: "a", log: &log, skip: true})
	if err != nil || rep.Changed() || len(log) != 0 {
		t.Fatalf("rep %+v err %v log %v", rep, err, log)
	}
}
