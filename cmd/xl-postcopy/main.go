// Command xl-postcopy live-migrates Xen domains with post-copy, adaptive
// pre-paging, dynamic self-ballooning and pre-record planning. It follows
// xl's command line: `xl-postcopy migrate [options] <domain> <host>`.
//
// Each subcommand lives in its own file and registers itself in init(), so
// that the command table is the union of those files.
package main

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/spf13/pflag"

	"github.com/xl-postcopy/xl-postcopy/xen/lab"
)

// command is one xl-postcopy subcommand.
type command struct {
	name    string
	args    string // usage after the name, e.g. "[options] <domain> <host>"
	summary string // one line for the command list
	hidden  bool   // internal helpers (re-exec'd children) are not listed
	// setup declares the flags; run executes with the positional args.
	setup func(fs *pflag.FlagSet)
	run   func(fs *pflag.FlagSet, args []string) error
}

var commands = map[string]*command{}

// flagSet is c's options as the command line, --help, the man pages and
// the bash completion all see them (one definition, so they cannot drift).
func (c *command) flagSet() *pflag.FlagSet {
	fs := pflag.NewFlagSet("xl-postcopy "+c.name, pflag.ContinueOnError)
	fs.SortFlags = false
	if c.setup != nil {
		c.setup(fs)
	}
	return fs
}

func register(c *command) {
	if _, dup := commands[c.name]; dup {
		panic("duplicate command " + c.name)
	}
	commands[c.name] = c
}

// usageError marks an error caused by the command line: it is printed with
// a pointer to --help and exits 2, like xl.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error { return usageError{fmt.Sprintf(format, a...)} }

func mainUsage() {
	fmt.Fprintf(os.Stderr, "Usage: xl-postcopy <command> [options] [args]\n\nCommands:\n")
	names := make([]string, 0, len(commands))
	for n, c := range commands {
		if !c.hidden {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	for _, n := range names {
		c := commands[n]
		fmt.Fprintf(os.Stderr, "  %-16s %s\n", n, c.summary)
	}
	fmt.Fprintf(os.Stderr, "\nRun 'xl-postcopy <command> --help' for a command's options.\n")
}

func main() {
	// The lab domain's guest processes are this same binary, re-executed.
	if lab.IsGuest() {
		os.Exit(lab.GuestMain())
	}
	os.Exit(runMain(os.Args[1:]))
}

func runMain(argv []string) int {
	if len(argv) == 0 || argv[0] == "-h" || argv[0] == "--help" || argv[0] == "help" {
		mainUsage()
		if len(argv) == 0 {
			return 2
		}
		return 0
	}
	// "lab migrate" style two-word commands are registered as "lab migrate".
	name := argv[0]
	rest := argv[1:]
	if len(rest) > 0 {
		if _, ok := commands[name+" "+rest[0]]; ok {
			name, rest = name+" "+rest[0], rest[1:]
		}
	}
	c, ok := commands[name]
	if !ok {
		var subs []string
		for n := range commands {
			if strings.HasPrefix(n, name+" ") {
				subs = append(subs, strings.TrimPrefix(n, name+" "))
			}
		}
		sort.Strings(subs)
		if len(subs) > 0 {
			fmt.Fprintf(os.Stderr, "xl-postcopy %s: want a subcommand: %s\n", name, strings.Join(subs, ", "))
		} else {
			fmt.Fprintf(os.Stderr, "xl-postcopy: unknown command %q\n", name)
			mainUsage()
		}
		return 2
	}
	fs := c.flagSet()
	fs.Usage = func() {
		fmt.Fprintf(os.Stderr, "Usage: xl-postcopy %s %s\n\n%s\n\nOptions:\n%s", c.name, c.args, c.summary, fs.FlagUsages())
	}
	if err := fs.Parse(rest); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return 0
		}
		fmt.Fprintf(os.Stderr, "xl-postcopy %s: %v\nRun 'xl-postcopy %s --help' for usage.\n", c.name, err, c.name)
		return 2
	}
	if err := c.run(fs, fs.Args()); err != nil {
		var ue usageError
		if errors.As(err, &ue) {
			fmt.Fprintf(os.Stderr, "xl-postcopy %s: %v\nRun 'xl-postcopy %s --help' for usage.\n", c.name, err, c.name)
			return 2
		}
		fmt.Fprintf(os.Stderr, "xl-postcopy %s: %v\n", c.name, err)
		return 1
	}
	return 0
}
