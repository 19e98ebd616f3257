package ssh

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"slices"
	"strings"
	"sync"

	xssh "golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/agent"
)

// IdentityError is an identity file that cannot be used. It is never retried.
type IdentityError struct {
	File   string
	Reason string
}

func (e *IdentityError) Error() string { return "identity file " + e.File + " " + e.Reason }

// loadIdentity reads an unencrypted private key. Errors never quote the
// file's content.
func loadIdentity(path string) (xssh.Signer, error) {
	data, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, &IdentityError{File: path, Reason: "does not exist"}
	case errors.Is(err, fs.ErrPermission):
		return nil, &IdentityError{File: path, Reason: "is not readable by this user (permission denied)"}
	case err != nil:
		return nil, &IdentityError{File: path, Reason: "cannot be read: " + err.Error()}
	}
	signer, err := xssh.ParsePrivateKey(data)
	var missing *xssh.PassphraseMissingError
	switch {
	case errors.As(err, &missing):
		return nil, &IdentityError{File: path, Reason: fmt.Sprintf(
			"is passphrase-protected: load it into ssh-agent (ssh-add %s) and set useAgent", ShellQuote(path))}
	case err != nil && strings.HasSuffix(path, ".pub"):
		return nil, &IdentityError{File: path, Reason: "is a public key: give the private key file (without .pub)"}
	case err != nil:
		// The parser's message may not say much, but never echo key bytes.
		return nil, &IdentityError{File: path, Reason: "is not an OpenSSH/PEM private key"}
	}
	return signer, nil
}

// authSetup holds the authentication of one connection: the identity file's
// key first, then the agent's keys. Close releases the agent connection once
// the handshake is over.
type authSetup struct {
	methods []xssh.AuthMethod
	desc    []string // what is offered, for error messages
	agent   net.Conn
	once    sync.Once
}

func (a *authSetup) Close() {
	a.once.Do(func() {
		if a.agent != nil {
			a.agent.Close()
		}
	})
}

// newAuth prepares authentication for user on target host: the identity
// file, plus ssh-agent when useAgent and SSH_AUTH_SOCK is set. A
// passphrase-protected identity file is an error unless the agent is in
// use (it may hold the key).
func newAuth(host, identityFile string, useAgent bool, log Logger) (*authSetup, error) {
	a := &authSetup{}
	var signers []xssh.Signer

	sock := os.Getenv("SSH_AUTH_SOCK")
	agentUsable := useAgent && sock != ""

	if identityFile != "" {
		s, err := loadIdentity(identityFile)
		var ie *IdentityError
		switch {
		case err == nil:
			signers = append(signers, s)
			a.desc = append(a.desc, "identity file "+identityFile+" ("+keyDesc(s.PublicKey())+")")
		case agentUsable && errors.As(err, &ie) && strings.Contains(ie.Reason, "passphrase"):
			log.logf(host, "identity file %s is passphrase-protected: relying on ssh-agent", identityFile)
		default:
			return nil, err
		}
	}

	var ag agent.ExtendedAgent
	if agentUsable {
		conn, err := net.Dial("unix", sock)
		if err != nil {
			if len(signers) == 0 {
				return nil, fmt.Errorf("ssh-agent at SSH_AUTH_SOCK=%s: %w", sock, err)
			}
			log.logf(host, "ssh-agent at SSH_AUTH_SOCK=%s unreachable, using the identity file only: %v", sock, err)
		} else {
			a.agent = conn
			ag = agent.NewClient(conn)
			a.desc = append(a.desc, "ssh-agent keys")
		}
	}
	if len(signers) == 0 && ag == nil {
		switch {
		case identityFile == "" && useAgent:
			return nil, errors.New("no SSH key: identityFile is empty and SSH_AUTH_SOCK is not set (start ssh-agent and ssh-add the key, or set identityFile)")
		default:
			return nil, errors.New("no SSH key: set identityFile, or useAgent with a running ssh-agent")
		}
	}

	a.methods = []xssh.AuthMethod{xssh.PublicKeysCallback(func() ([]xssh.Signer, error) {
		out := slices.Clone(signers)
		if ag == nil {
			return out, nil
		}
		agentSigners, err := ag.Signers()
		if err != nil {
			log.logf(host, "ssh-agent: listing keys: %v", err)
			return out, nil
		}
		for _, s := range agentSigners {
			dup := false
			for _, have := range signers {
				if bytes.Equal(have.PublicKey().Marshal(), s.PublicKey().Marshal()) {
					dup = true
				}
			}
			if !dup {
				out = append(out, s)
			}
		}
		return out, nil
	})}
	return a, nil
}

// AuthError is the server rejecting every key offered. It is never retried.
type AuthError struct {
	Host    string
	User    string
	Offered []string
	Err     error
}

func (e *AuthError) Error() string {
	msg := fmt.Sprintf("host %s: authentication as %s failed (offered: %s): %v",
		e.Host, e.User, strings.Join(e.Offered, ", "), e.Err)
	if strings.Contains(e.Err.Error(), "Too many authentication failures") {
		return msg + " (the server's MaxAuthTries was reached: set identityFile so the right key is offered first)"
	}
	return msg + fmt.Sprintf(" (is the public key in ~%s/.ssh/authorized_keys on the host?)", e.User)
}

func (e *AuthError) Unwrap() error { return e.Err }

func isAuthFailure(err error) bool {
	if err == nil {
		return false
	}
	s := err.Error()
	return strings.Contains(s, "unable to authenticate") ||
		strings.Contains(s, "Too many authentication failures") ||
		strings.Contains(s, "no supported methods remain")
}
