package ssh

import (
	"bytes"
	"fmt"
	"io"
	"regexp"
	"strings"
	"sync"
)

// Logger receives one line of per-host detail: the commands run, their
// output line by line, uploads (path, size and mode, never the data) and
// connection attempts. Lines are redacted (see Redact) before they reach it.
// Pass one only at high verbosity; nil means quiet. It is called from many
// goroutines at once during a fan-out.
type Logger func(host, line string)

// WriterLogger returns a Logger that writes "host: line" to w, one line per
// call, serialised so that lines of different hosts never interleave.
func WriterLogger(w io.Writer) Logger {
	var mu sync.Mutex
	return func(host, line string) {
		mu.Lock()
		defer mu.Unlock()
		fmt.Fprintf(w, "%s: %s\n", host, line)
	}
}

func (l Logger) logf(host, format string, args ...any) {
	if l != nil {
		l(host, Redact(fmt.Sprintf(format, args...)))
	}
}

const redacted = "<redacted>"

var (
	// kubeadm bootstrap token "abcdef.0123456789abcdef": the id before the
	// dot is public, the secret after it is not.
	tokenRE = regexp.MustCompile(`\b([a-z0-9]{6})\.[a-z0-9]{16}\b`)
	// --certificate-key <hex>, --certificate-key=<hex>, certificateKey: <hex>
	certKeyRE = regexp.MustCompile(`(?i)(--certificate-key[= ]+|certificateKey:\s*["']?)[0-9a-f]{64}`)
	// kubeadm init prints the certificate key alone on a line.
	hexLineRE = regexp.MustCompile(`(?m)^(\s*)[0-9a-fA-F]{64}(\s*)$`)
	// kubeconfig credentials and bearer tokens.
	secretFieldRE = regexp.MustCompile(`(?i)\b(client-key-data|token|password)(\s*:\s*["']?)[^\s"']+`)
	bearerRE      = regexp.MustCompile(`(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}`)
	// PEM private keys, possibly cut off at the end of the string.
	privKeyRE = regexp.MustCompile(`-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\z)`)
)

// Redact hides secrets that commands and their output may carry: kubeadm
// bootstrap token secrets, certificate keys (after --certificate-key, in
// certificateKey: fields, or alone on a line as kubeadm init prints them),
// kubeconfig client keys and tokens, bearer tokens and PEM private keys.
// Public values stay readable: token ids and the
// --discovery-token-ca-cert-hash sha256:... pin.
func Redact(s string) string {
	s = privKeyRE.ReplaceAllString(s, "-----BEGIN ${1}PRIVATE KEY----- "+redacted+" -----END ${1}PRIVATE KEY-----")
	s = certKeyRE.ReplaceAllString(s, "${1}"+redacted)
	s = hexLineRE.ReplaceAllString(s, "${1}"+redacted+"${2}")
	s = tokenRE.ReplaceAllString(s, "${1}."+redacted)
	s = secretFieldRE.ReplaceAllString(s, "${1}${2}"+redacted)
	s = bearerRE.ReplaceAllString(s, "${1}"+redacted)
	return s
}

// lineLogger is an io.Writer that hands complete lines, redacted and
// prefixed, to a Logger. Lines inside a PEM private key block are dropped.
type lineLogger struct {
	log    Logger
	host   string
	prefix string
	buf    []byte
	inKey  bool
}

func newLineLogger(log Logger, host, prefix string) *lineLogger {
	return &lineLogger{log: log, host: host, prefix: prefix}
}

func (w *lineLogger) Write(p []byte) (int, error) {
	w.buf = append(w.buf, p...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			break
		}
		w.emit(string(w.buf[:i]))
		w.buf = w.buf[i+1:]
	}
	// Bound memory for output without newlines.
	if len(w.buf) > 64<<10 {
		w.emit(string(w.buf))
		w.buf = w.buf[:0]
	}
	return len(p), nil
}

// Flush emits a final line without a newline.
func (w *lineLogger) Flush() {
	if len(w.buf) > 0 {
		w.emit(string(w.buf))
		w.buf = nil
	}
}

func (w *lineLogger) emit(line string) {
	line = strings.TrimSuffix(line, "\r")
	switch {
	case w.inKey:
		if strings.Contains(line, "-----END") && strings.Contains(line, "PRIVATE KEY-----") {
			w.inKey = false
		}
		return
	case strings.Contains(line, "-----BEGIN") && strings.Contains(line, "PRIVATE KEY-----") &&
		!strings.Contains(line, "-----END"):
		w.inKey = true
		w.log(w.host, w.prefix+"-----BEGIN PRIVATE KEY----- "+redacted+" (lines hidden)")
		return
	}
	w.log(w.host, w.prefix+Redact(line))
}
