package ssh

import (
	"crypto/ed25519"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	xssh "golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
)

// HostKeyProblem says why a host key was refused.
type HostKeyProblem string

const (
	HostKeyUnknown HostKeyProblem = "unknown"
	HostKeyChanged HostKeyProblem = "changed"
	HostKeyRevoked HostKeyProblem = "revoked"
	// HostKeyInvalid is a host certificate that does not verify.
	HostKeyInvalid HostKeyProblem = "invalid"
)

// HostKeyError is a refused host key. It is never retried.
type HostKeyError struct {
	Host      string // inventory name
	Addr      string // host:port as checked against known_hosts
	File      string // the known_hosts file
	Problem   HostKeyProblem
	Presented xssh.PublicKey
	Known     []knownhosts.KnownKey // the lines that matched Addr (changed, revoked)
	Err       error                 // the verifier's error (invalid)
}

func keyDesc(k xssh.PublicKey) string {
	return k.Type() + " " + xssh.FingerprintSHA256(k)
}

func (e *HostKeyError) Error() string {
	host, port, _ := net.SplitHostPort(e.Addr)
	switch e.Problem {
	case HostKeyChanged:
		var known, lines []string
		for _, k := range e.Known {
			known = append(known, fmt.Sprintf("%s (line %d)", keyDesc(k.Key), k.Line))
			lines = append(lines, fmt.Sprint(k.Line))
		}
		return fmt.Sprintf("host %s: host key for %s changed: %s has %s, the host presented %s; "+
			"possible MITM; if intended, remove line %s of %s (ssh-keygen -R %s -f %s)",
			e.Host, e.Addr, e.File, strings.Join(known, ", "), keyDesc(e.Presented),
			strings.Join(lines, ", "), e.File, ShellQuote(knownhosts.Normalize(e.Addr)), ShellQuote(e.File))
	case HostKeyRevoked:
		return fmt.Sprintf("host %s: host key for %s (%s) is marked @revoked in %s line %d",
			e.Host, e.Addr, keyDesc(e.Presented), e.File, e.Known[0].Line)
	case HostKeyInvalid:
		return fmt.Sprintf("host %s: host certificate for %s (%s) refused using %s: %v",
			e.Host, e.Addr, keyDesc(e.Presented), e.File, e.Err)
	default:
		return fmt.Sprintf("host %s: host key for %s (%s) is not in %s: check the fingerprint and add it "+
			"(ssh-keyscan -p %s %s >> %s), or set acceptNewHostKeys: true in the inventory's ssh: section to trust it on first use",
			e.Host, e.Addr, keyDesc(e.Presented), e.File, port, host, e.File)
	}
}

// knownHostsLocks serialises the check-and-append of accept-new per file, so
// that a fan-out over many hosts never writes the same file concurrently.
var knownHostsLocks sync.Map // cleaned path -> *sync.Mutex

func lockKnownHosts(path string) func() {
	mu, _ := knownHostsLocks.LoadOrStore(filepath.Clean(path), new(sync.Mutex))
	mu.(*sync.Mutex).Lock()
	return mu.(*sync.Mutex).Unlock
}

// loadKnownHosts reads a known_hosts file; a missing file is an empty one.
func loadKnownHosts(path string) (xssh.HostKeyCallback, error) {
	cb, err := knownhosts.New(path)
	if errors.Is(err, fs.ErrNotExist) {
		return knownhosts.New()
	}
	if err != nil {
		return nil, fmt.Errorf("known_hosts file %s: %w", path, err)
	}
	return cb, nil
}

// probeKey is a key no host has: checking it against known_hosts yields the
// keys known for an address.
var probeKey = func() xssh.PublicKey {
	pub, _, err := ed25519.GenerateKey(nil)
	if err != nil {
		panic(err)
	}
	k, err := xssh.NewPublicKey(pub)
	if err != nil {
		panic(err)
	}
	return k
}()

// knownKeys lists the known_hosts lines that match addr (host:port).
func knownKeys(cb xssh.HostKeyCallback, addr string) []knownhosts.KnownKey {
	err := cb(addr, &net.TCPAddr{IP: net.IPv4zero, Port: 22}, probeKey)
	var ke *knownhosts.KeyError
	if errors.As(err, &ke) {
		return ke.Want
	}
	return nil
}

// hasCertAuthority reports whether a known_hosts file trusts any host CA.
func hasCertAuthority(path string) bool {
	b, err := os.ReadFile(path)
	return err == nil && strings.Contains(string(b), "@cert-authority")
}

// hostKeyAlgorithms orders the host key algorithms so that the types present
// in known_hosts for the host are negotiated first (as OpenSSH does); the
// others follow, so a host that dropped its known key type is reported as a
// changed key rather than a failed negotiation. Host certificates are only
// asked for when the file has a @cert-authority line (nil: library default).
func hostKeyAlgorithms(known []knownhosts.KnownKey, certAuthority bool) []string {
	if len(known) == 0 && certAuthority {
		return nil
	}
	var algos []string
	for _, k := range known {
		switch t := k.Key.Type(); t {
		case xssh.KeyAlgoRSA:
			algos = append(algos, xssh.KeyAlgoRSASHA512, xssh.KeyAlgoRSASHA256, xssh.KeyAlgoRSA)
		default:
			algos = append(algos, t)
		}
	}
	for _, a := range xssh.SupportedAlgorithms().HostKeys {
		if certAuthority || !strings.Contains(a, "-cert-") {
			algos = append(algos, a)
		}
	}
	// Last, as in the library's default: SHA-1 RSA for very old servers.
	algos = append(algos, xssh.KeyAlgoRSA)
	var out []string
	for _, a := range algos {
		if !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	return out
}

// hostKeyCheck verifies one connection attempt's host key against a
// known_hosts file, and remembers why it refused.
type hostKeyCheck struct {
	host      string // inventory name
	file      string
	acceptNew bool
	log       Logger

	cb         xssh.HostKeyCallback
	algorithms []string

	mu  sync.Mutex
	err error // the refusal, if any
}

func newHostKeyCheck(host, addr, file string, acceptNew bool, log Logger) (*hostKeyCheck, error) {
	cb, err := loadKnownHosts(file)
	if err != nil {
		return nil, err
	}
	return &hostKeyCheck{
		host: host, file: file, acceptNew: acceptNew, log: log,
		cb: cb, algorithms: hostKeyAlgorithms(knownKeys(cb, addr), hasCertAuthority(file)),
	}, nil
}

func (h *hostKeyCheck) callback(addr string, remote net.Addr, key xssh.PublicKey) error {
	err := h.check(addr, remote, key)
	h.mu.Lock()
	h.err = err
	h.mu.Unlock()
	return err
}

// refusal is the error the callback refused the host key with, if any.
func (h *hostKeyCheck) refusal() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.err
}

func (h *hostKeyCheck) check(addr string, remote net.Addr, key xssh.PublicKey) error {
	err := h.cb(addr, remote, key)
	if err == nil {
		return nil
	}
	if herr := h.classify(addr, key, err); herr.Problem != HostKeyUnknown || !h.acceptNew {
		return herr
	}

	unlock := lockKnownHosts(h.file)
	defer unlock()
	// Another connection of the fan-out may have added it meanwhile.
	cb, lerr := loadKnownHosts(h.file)
	if lerr != nil {
		return lerr
	}
	if err := cb(addr, remote, key); err == nil {
		return nil
	} else if herr := h.classify(addr, key, err); herr.Problem != HostKeyUnknown {
		return herr
	}
	if err := appendKnownHost(h.file, addr, key); err != nil {
		return fmt.Errorf("host %s: accepting new host key for %s: %w", h.host, addr, err)
	}
	h.log.logf(h.host, "added host key %s for %s to %s", keyDesc(key), addr, h.file)
	return nil
}

func (h *hostKeyCheck) classify(addr string, key xssh.PublicKey, err error) *HostKeyError {
	e := &HostKeyError{Host: h.host, Addr: addr, File: h.file, Presented: key, Problem: HostKeyUnknown}
	var ke *knownhosts.KeyError
	var re *knownhosts.RevokedError
	switch {
	case errors.As(err, &re):
		e.Problem, e.Known = HostKeyRevoked, []knownhosts.KnownKey{re.Revoked}
	case errors.As(err, &ke) && len(ke.Want) > 0:
		e.Problem, e.Known = HostKeyChanged, ke.Want
	case errors.As(err, &ke):
	default:
		e.Problem, e.Err = HostKeyInvalid, err
	}
	return e
}

// appendKnownHost adds "addr key" to the known_hosts file, creating the file
// (0600) and its directory (0700). addr is host:port; port 22 is written as
// the bare host and others as [host]:port, as OpenSSH does.
func appendKnownHost(file, addr string, key xssh.PublicKey) error {
	if err := os.MkdirAll(filepath.Dir(file), 0o700); err != nil {
		return err
	}
	f, err := os.OpenFile(file, os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	line := knownhosts.Line([]string{knownhosts.Normalize(addr)}, key) + "\n"
	// Keep the previous last line intact if it lacks its newline.
	if st, err := f.Stat(); err == nil && st.Size() > 0 {
		last := make([]byte, 1)
		if _, err := f.ReadAt(last, st.Size()-1); err == nil && last[0] != '\n' {
			line = "\n" + line
		}
	}
	if _, err := f.WriteString(line); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
