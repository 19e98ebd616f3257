// Package runner runs an ordered list of typed steps (k0sctl's phases,
// kind's actions): each step has a title and Run; a step may also say it has
// nothing to do (Skipper), describe itself under --dry-run (DryRunner) and
// undo its work (Rollbacker). When a step fails, the runner rolls back the
// failed step and then every completed step, newest first, and reports both
// the failure and the rollback.
package runner

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/kpfree/kpfree/internal/ui"
)

// Step is one unit of work.
type Step interface {
	Title() string
	Run(ctx context.Context) error
}

// Skipper is a Step that can tell it has nothing to do (idempotent re-runs).
type Skipper interface {
	// Skip returns a reason when the step's work is already done.
	Skip(ctx context.Context) (reason string, skip bool, err error)
}

// DryRunner is a Step that can say what it would do without doing it.
type DryRunner interface {
	DryRun(ctx context.Context) error
}

// Rollbacker is a Step that can undo its work, including a partial run.
type Rollbacker interface {
	Rollback(ctx context.Context) error
}

// Status of a step in a report.
type Status string

const (
	OK             Status = "ok"
	Failed         Status = "failed"
	Skipped        Status = "skipped"
	DryRun         Status = "dry-run"
	NotRun         Status = "not-run"
	RolledBack     Status = "rolled-back"
	RollbackFailed Status = "rollback-failed"
)

// StepResult is what happened to one step.
type StepResult struct {
	Title         string  `json:"title"`
	Status        Status  `json:"status"`
	Seconds       float64 `json:"seconds"`
	Reason        string  `json:"reason,omitempty"`
	Error         string  `json:"error,omitempty"`
	RollbackError string  `json:"rollbackError,omitempty"`
}

// Report is the outcome of a run, written as JSON with -o json.
type Report struct {
	OK     bool         `json:"ok"`
	DryRun bool         `json:"dryRun,omitempty"`
	Steps  []StepResult `json:"steps"`
}

// Changed reports whether any step did work (not skipped, not dry-run).
func (r Report) Changed() bool {
	for _, s := range r.Steps {
		if s.Status == OK || s.Status == RolledBack || s.Status == RollbackFailed {
			return true
		}
	}
	return false
}

// Runner runs steps with status lines on UI.
type Runner struct {
	UI     *ui.UI
	DryRun bool
	// NoRollback leaves completed work in place when a step fails.
	NoRollback bool
}

// StepError is returned by Run when a step failed.
type StepError struct {
	Step        string
	Err         error
	RollbackErr error
}

func (e *StepError) Error() string {
	msg := fmt.Sprintf("step %q failed: %v", e.Step, e.Err)
	if e.RollbackErr != nil {
		msg += fmt.Sprintf("; rollback failed too: %v", e.RollbackErr)
	}
	return msg
}

func (e *StepError) Unwrap() error { return e.Err }

// Run runs steps in order and returns the report; the error is a *StepError
// when a step failed.
func (r *Runner) Run(ctx context.Context, steps ...Step) (Report, error) {
	u := r.UI
	if u == nil {
		u = ui.Discard()
	}
	rep := Report{OK: true, DryRun: r.DryRun, Steps: make([]StepResult, len(steps))}
	for i, s := range steps {
		rep.Steps[i] = StepResult{Title: s.Title(), Status: NotRun}
	}
	var done []int // steps that ran (and may be rolled back), in order
	for i, s := range steps {
		res := &rep.Steps[i]
		start := time.Now()
		st := u.Start(s.Title())
		if sk, ok := s.(Skipper); ok {
			reason, skip, err := sk.Skip(ctx)
			if err == nil && skip {
				res.Status, res.Reason = Skipped, reason
				res.Seconds = time.Since(start).Seconds()
				st.Skip(reason)
				continue
			}
			if err != nil && !r.DryRun {
				// A step that cannot tell whether it is done runs anyway;
				// Run reports the real problem if there is one.
				u.Debugf("%s: could not check whether it is needed: %v", s.Title(), err)
			}
		}
		var err error
		if r.DryRun {
			if d, ok := s.(DryRunner); ok {
				err = d.DryRun(ctx)
			}
			if err == nil {
				res.Status = DryRun
				res.Seconds = time.Since(start).Seconds()
				st.End(nil)
				continue
			}
		} else {
			err = s.Run(ctx)
		}
		res.Seconds = time.Since(start).Seconds()
		st.End(err)
		if err == nil {
			res.Status = OK
			done = append(done, i)
			continue
		}
		res.Status, res.Error = Failed, err.Error()
		rep.OK = false
		serr := &StepError{Step: s.Title(), Err: err}
		if !r.DryRun && !r.NoRollback {
			serr.RollbackErr = r.rollback(ctx, u, steps, append(done, i), &rep)
		}
		return rep, serr
	}
	return rep, nil
}

// rollback undoes the given steps newest first. It runs with a context that
// survives the cancellation of ctx, so an interrupted run still cleans up.
func (r *Runner) rollback(ctx context.Context, u *ui.UI, steps []Step, idx []int, rep *Report) error {
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Minute)
	defer cancel()
	var errs []error
	for k := len(idx) - 1; k >= 0; k-- {
		i := idx[k]
		rb, ok := steps[i].(Rollbacker)
		if !ok {
			continue
		}
		st := u.Start("Roll back: " + steps[i].Title())
		err := rb.Rollback(rctx)
		st.End(err)
		res := &rep.Steps[i]
		if err != nil {
			res.RollbackError = err.Error()
			if res.Status == OK {
				res.Status = RollbackFailed
			}
			errs = append(errs, fmt.Errorf("%s: %w", steps[i].Title(), err))
			continue
		}
		if res.Status == OK {
			res.Status = RolledBack
		}
	}
	return errors.Join(errs...)
}

// Func is a Step made of a title and a function, for small steps.
type Func struct {
	Name string
	Fn   func(ctx context.Context) error
}

func (f Func) Title() string                 { return f.Name }
func (f Func) Run(ctx context.Context) error { return f.Fn(ctx) }
