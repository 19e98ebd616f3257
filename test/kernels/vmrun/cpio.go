package main

import (
	"bufio"
	"fmt"
	"io"
	"io/fs"
	"path"
	"strings"
)

// cpioWriter writes a "newc" (SVR4, no CRC) cpio archive, the format the
// kernel unpacks as an initramfs. It creates parent directories on demand, so
// callers only add files, symlinks and device nodes.
type cpioWriter struct {
	w    *bufio.Writer
	off  int64
	ino  uint32
	dirs map[string]bool
	err  error
}

func newCpioWriter(w io.Writer) *cpioWriter {
	return &cpioWriter{w: bufio.NewWriterSize(w, 1<<20), ino: 1, dirs: map[string]bool{"": true, ".": true, "/": true}}
}

// Mode type bits as stored in cpio (the same as struct stat's st_mode).
const (
	sIFDIR = 0o040000
	sIFREG = 0o100000
	sIFLNK = 0o120000
	sIFCHR = 0o020000
)

func (c *cpioWriter) write(p []byte) {
	if c.err != nil {
		return
	}
	n, err := c.w.Write(p)
	c.off += int64(n)
	c.err = err
}

func (c *cpioWriter) pad() {
	if r := c.off % 4; r != 0 {
		c.write(make([]byte, 4-r))
	}
}

func (c *cpioWriter) header(name string, mode uint32, size int64, rmajor, rminor uint32) {
	name = strings.TrimPrefix(path.Clean("/"+name), "/")
	if name == "" {
		name = "."
	}
	nlink := uint32(1)
	if mode&0o170000 == sIFDIR {
		nlink = 2
	}
	ino := c.ino
	c.ino++
	if name == "TRAILER!!!" {
		ino, nlink = 0, 1
	}
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		ino, mode, 0, 0, nlink, 0, uint32(size), 0, 0, rmajor, rminor, len(name)+1, 0)
	c.write([]byte(hdr))
	c.write([]byte(name))
	c.write([]byte{0})
	c.pad()
}

// Mkdir adds a directory (and its parents) once.
func (c *cpioWriter) Mkdir(name string, perm fs.FileMode) {
	name = strings.TrimPrefix(path.Clean("/"+name), "/")
	if c.dirs[name] {
		return
	}
	c.Mkdir(path.Dir(name), 0o755)
	c.dirs[name] = true
	c.header(name, sIFDIR|uint32(perm.Perm()), 0, 0, 0)
}

// File adds a regular file with the given contents.
func (c *cpioWriter) File(name string, perm fs.FileMode, data []byte) {
	c.Mkdir(path.Dir(path.Clean("/"+name)), 0o755)
	c.header(name, sIFREG|uint32(perm.Perm()), int64(len(data)), 0, 0)
	c.write(data)
	c.pad()
}

// FileFrom adds a regular file of the given size streamed from r.
func (c *cpioWriter) FileFrom(name string, perm fs.FileMode, size int64, r io.Reader) {
	if size > 0xFFFFFFFF {
		c.err = fmt.Errorf("cpio: %s: %d bytes is too large for newc", name, size)
		return
	}
	c.Mkdir(path.Dir(path.Clean("/"+name)), 0o755)
	c.header(name, sIFREG|uint32(perm.Perm()), size, 0, 0)
	if c.err != nil {
		return
	}
	n, err := io.CopyN(c.w, r, size)
	c.off += n
	if err != nil {
		c.err = fmt.Errorf("cpio: %s: %w", name, err)
		return
	}
	c.pad()
}

// Symlink adds a symbolic link name -> target.
func (c *cpioWriter) Symlink(name, target string) {
	c.Mkdir(path.Dir(path.Clean("/"+name)), 0o755)
	c.header(name, sIFLNK|0o777, int64(len(target)), 0, 0)
	c.write([]byte(target))
	c.pad()
}

// CharDev adds a character device node.
func (c *cpioWriter) CharDev(name string, perm fs.FileMode, major, minor uint32) {
	c.Mkdir(path.Dir(path.Clean("/"+name)), 0o755)
	c.header(name, sIFCHR|uint32(perm.Perm()), 0, major, minor)
}

// Close writes the trailer and flushes. It does not close the underlying writer.
func (c *cpioWriter) Close() error {
	c.header("TRAILER!!!", 0, 0, 0, 0)
	if c.err == nil {
		c.err = c.w.Flush()
	}
	return c.err
}
