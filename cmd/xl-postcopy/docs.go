package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/spf13/pflag"
)

// gen-docs writes the man pages and the bash completion from the command
// table and each command's own flag definitions (flagSet), so what the
// package installs says what the binary does. `make deb` runs it.
func init() {
	register(&command{
		name:    "gen-docs",
		args:    "[--man DIR] [--bash FILE]",
		summary: "write the man pages and the bash completion from the commands' own flag definitions (packaging)",
		hidden:  true,
		setup: func(fs *pflag.FlagSet) {
			fs.String("man", "", "directory for the section-1 man pages (xl-postcopy.1, xl-postcopy-COMMAND.1)")
			fs.String("bash", "", "file for the bash completion script")
			fs.String("date", "", "date printed in the pages' footer, e.g. the changelog's (default: none)")
		},
		run: func(fs *pflag.FlagSet, args []string) error {
			if len(args) != 0 {
				return usagef("no arguments expected")
			}
			man, _ := fs.GetString("man")
			bash, _ := fs.GetString("bash")
			date, _ := fs.GetString("date")
			if man == "" && bash == "" {
				return usagef("want --man DIR, --bash FILE or both")
			}
			if man != "" {
				if err := writeManPages(man, date); err != nil {
					return err
				}
			}
			if bash != "" {
				if err := writeFile(bash, func(w io.Writer) error { return writeBashCompletion(w) }); err != nil {
					return err
				}
			}
			return nil
		},
	})
}

// documented lists the commands an administrator runs (not the hidden
// helpers), sorted.
func documented() []*command {
	var out []*command
	for _, c := range commands {
		if !c.hidden {
			out = append(out, c)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

// manName is a command's page: "lab migrate" → xl-postcopy-lab-migrate.
func manName(c *command) string { return "xl-postcopy-" + strings.ReplaceAll(c.name, " ", "-") }

func writeFile(path string, f func(io.Writer) error) error {
	tmp := path + ".tmp"
	out, err := os.Create(tmp)
	if err != nil {
		return err
	}
	if err := f(out); err != nil {
		out.Close()
		os.Remove(tmp)
		return err
	}
	if err := out.Close(); err != nil {
		os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, path)
}

func writeManPages(dir, date string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := writeFile(filepath.Join(dir, "xl-postcopy.1"), func(w io.Writer) error { return writeMainPage(w, date) }); err != nil {
		return fmt.Errorf("man page xl-postcopy.1: %w", err)
	}
	for _, c := range documented() {
		p := filepath.Join(dir, manName(c)+".1")
		if err := writeFile(p, func(w io.Writer) error { return writeCommandPage(w, c, date) }); err != nil {
			return fmt.Errorf("man page %s: %w", p, err)
		}
	}
	return nil
}

// roff escapes text for a man page: backslashes, and a leading dot or
// quote that troff would take for a request.
func roff(s string) string {
	s = strings.ReplaceAll(s, `\`, `\e`)
	s = strings.ReplaceAll(s, "-", `\-`)
	var b strings.Builder
	for _, line := range strings.Split(s, "\n") {
		if strings.HasPrefix(line, ".") || strings.HasPrefix(line, "'") {
			b.WriteString(`\&`)
		}
		b.WriteString(line)
		b.WriteString("\n")
	}
	return strings.TrimSuffix(b.String(), "\n")
}

func writeMainPage(w io.Writer, date string) error {
	fmt.Fprintf(w, ".TH XL\\-POSTCOPY 1 %q \"xl-postcopy\" \"Xen administration\"\n", date)
	fmt.Fprintf(w, ".SH NAME\nxl\\-postcopy \\- live\\-migrate Xen domains with post\\-copy\n")
	fmt.Fprintf(w, ".SH SYNOPSIS\n.B xl\\-postcopy\n.I command\n[\\fIoptions\\fR] [\\fIargs\\fR]\n")
	fmt.Fprintf(w, ".SH DESCRIPTION\n%s\n", roff("xl-postcopy moves a running Xen domain to another host the way xl migrate does, "+
		"but with post-copy: the CPU state goes first, the guest resumes on the destination at once, and its memory follows, "+
		"pushed in the background and fetched on demand when the guest touches a page it lacks. "+
		"Pre-copy (any domain) is handed to xl migrate. Run it as root in dom0. "+
		"Each command has its own page, and --help prints the same options."))
	fmt.Fprintf(w, ".SH COMMANDS\n")
	for _, c := range documented() {
		fmt.Fprintf(w, ".TP\n.B %s\n%s (see \\fB%s\\fR(1))\n", roff(c.name), roff(c.summary), roff(manName(c)))
	}
	fmt.Fprintf(w, ".SH EXIT STATUS\n0 on success, 1 when the command failed (the message says where the domain runs and what to do), 2 for a usage error.\n")
	fmt.Fprintf(w, ".SH SEE ALSO\n")
	var refs []string
	for _, c := range documented() {
		refs = append(refs, fmt.Sprintf(".BR %s (1)", roff(manName(c))))
	}
	refs = append(refs, ".BR xl (1)")
	fmt.Fprintf(w, "%s\n", strings.Join(refs, ",\n"))
	return nil
}

func writeCommandPage(w io.Writer, c *command, date string) error {
	title := strings.ToUpper(roff(manName(c)))
	fmt.Fprintf(w, ".TH %s 1 %q \"xl-postcopy\" \"Xen administration\"\n", title, date)
	fmt.Fprintf(w, ".SH NAME\n%s \\- %s\n", roff(manName(c)), roff(c.summary))
	fmt.Fprintf(w, ".SH SYNOPSIS\n.B xl\\-postcopy %s\n%s\n", roff(c.name), roff(c.args))
	fmt.Fprintf(w, ".SH DESCRIPTION\n%s\n", roff(c.summary))
	fs := c.flagSet()
	fmt.Fprintf(w, ".SH OPTIONS\n")
	fs.VisitAll(func(f *pflag.Flag) {
		if f.Hidden {
			return
		}
		name := `\-\-` + roff(f.Name)
		if f.Shorthand != "" {
			name = `\-` + f.Shorthand + ", " + name
		}
		varname, usage := pflag.UnquoteUsage(f)
		if varname != "" {
			name += " " + `\fI` + roff(varname) + `\fR`
		}
		fmt.Fprintf(w, ".TP\n.B %s\n%s", name, roff(usage))
		if f.DefValue != "" && f.DefValue != "false" && f.DefValue != "[]" && f.DefValue != "0" {
			fmt.Fprintf(w, " (default: %s)", roff(f.DefValue))
		}
		fmt.Fprintf(w, "\n")
	})
	fmt.Fprintf(w, ".TP\n.B \\-h, \\-\\-help\nprint the options and exit\n")
	fmt.Fprintf(w, ".SH SEE ALSO\n.BR xl\\-postcopy (1)\n")
	return nil
}

// writeBashCompletion writes a completion for the commands (two-word ones
// such as "lab migrate" too) and each command's long options.
func writeBashCompletion(w io.Writer) error {
	var top []string
	seen := map[string]bool{}
	subs := map[string][]string{}
	for _, c := range documented() {
		first, rest, two := strings.Cut(c.name, " ")
		if !seen[first] {
			seen[first] = true
			top = append(top, first)
		}
		if two {
			subs[first] = append(subs[first], rest)
		}
	}
	fmt.Fprintf(w, "# bash completion for xl-postcopy (generated by xl-postcopy gen-docs; do not edit)\n")
	fmt.Fprintf(w, "_xl_postcopy() {\n\tlocal cur=\"${COMP_WORDS[COMP_CWORD]}\" cmd=\"${COMP_WORDS[1]}\" opts=\"\"\n")
	fmt.Fprintf(w, "\tif [ \"$COMP_CWORD\" -eq 1 ]; then\n\t\tCOMPREPLY=($(compgen -W %q -- \"$cur\"))\n\t\treturn\n\tfi\n", strings.Join(top, " "))
	var firsts []string
	for f := range subs {
		firsts = append(firsts, f)
	}
	sort.Strings(firsts)
	for _, f := range firsts {
		fmt.Fprintf(w, "\tif [ \"$cmd\" = %q ] && [ \"$COMP_CWORD\" -eq 2 ]; then\n\t\tCOMPREPLY=($(compgen -W %q -- \"$cur\"))\n\t\treturn\n\tfi\n",
			f, strings.Join(subs[f], " "))
		fmt.Fprintf(w, "\t[ \"$cmd\" = %q ] && cmd=\"$cmd ${COMP_WORDS[2]}\"\n", f)
	}
	fmt.Fprintf(w, "\tcase \"$cmd\" in\n")
	for _, c := range documented() {
		var flags []string
		c.flagSet().VisitAll(func(f *pflag.Flag) {
			if !f.Hidden {
				flags = append(flags, "--"+f.Name)
			}
		})
		flags = append(flags, "--help")
		fmt.Fprintf(w, "\t%q) opts=%q ;;\n", c.name, strings.Join(flags, " "))
	}
	fmt.Fprintf(w, "\tesac\n\tif [[ \"$cur\" == -* ]]; then\n\t\tCOMPREPLY=($(compgen -W \"$opts\" -- \"$cur\"))\n\telse\n\t\tCOMPREPLY=($(compgen -f -- \"$cur\"))\n\tfi\n}\n")
	fmt.Fprintf(w, "complete -F _xl_postcopy xl-postcopy\n")
	return nil
}
