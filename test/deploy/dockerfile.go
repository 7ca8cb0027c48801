// Package deploy proves what an installer gets: the manifests apply to a
// real kube-apiserver (test/apiserver), their RBAC lets each component do
// its job and nothing more (real requests with tokens minted for the
// manifests' ServiceAccounts), the workloads have the security settings
// they claim, and the Dockerfile (which this machine cannot build) is well
// formed and ships the binaries the manifests run.
package deploy

import (
	"encoding/json"
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// Instruction is one Dockerfile instruction, continuation lines joined.
type Instruction struct {
	Line  int    // first line, 1-based
	Cmd   string // upper case: FROM, RUN, COPY, ...
	Flags map[string]string
	// Args are the whitespace-separated arguments after the flags, or the
	// elements of the JSON array form.
	Args []string
	JSON bool   // exec (JSON array) form
	Rest string // the text after the instruction and its flags
}

// Stage is one FROM and the instructions that follow it.
type Stage struct {
	Index        int
	Name         string // "" when unnamed
	Base         string // image after ARG substitution
	Instructions []Instruction
}

// Dockerfile is a parsed Dockerfile.
type Dockerfile struct {
	// GlobalArgs are the ARGs before the first FROM with their defaults.
	GlobalArgs map[string]string
	Stages     []*Stage
}

// Final returns the last stage, the image that is built.
func (d *Dockerfile) Final() *Stage { return d.Stages[len(d.Stages)-1] }

// Stage returns a stage by name or index.
func (d *Dockerfile) Stage(ref string) *Stage {
	for _, s := range d.Stages {
		if s.Name != "" && strings.EqualFold(s.Name, ref) {
			return s
		}
	}
	if i, err := strconv.Atoi(ref); err == nil && i >= 0 && i < len(d.Stages) {
		return d.Stages[i]
	}
	return nil
}

var knownInstructions = map[string]bool{
	"FROM": true, "RUN": true, "CMD": true, "LABEL": true, "MAINTAINER": true, "EXPOSE": true,
	"ENV": true, "ADD": true, "COPY": true, "ENTRYPOINT": true, "VOLUME": true, "USER": true,
	"WORKDIR": true, "ARG": true, "ONBUILD": true, "STOPSIGNAL": true, "HEALTHCHECK": true, "SHELL": true,
}

// flags each instruction accepts.
var knownFlags = map[string]map[string]bool{
	"FROM": {"platform": true},
	"COPY": {"from": true, "chown": true, "chmod": true, "link": true, "parents": true, "exclude": true},
	"ADD":  {"chown": true, "chmod": true, "link": true, "keep-git-dir": true, "checksum": true, "exclude": true},
	"RUN":  {"mount": true, "network": true, "security": true},
}

var (
	stageName = regexp.MustCompile(`^[a-z][a-z0-9_.-]*$`)
	varRef    = regexp.MustCompile(`\$\{([A-Za-z_][A-Za-z0-9_]*)(:[-+][^}]*)?\}|\$([A-Za-z_][A-Za-z0-9_]*)`)
)

// ParseDockerfile parses and checks a Dockerfile: known instructions and
// flags, ARG only before the first FROM, FROM with an image and an optional
// unique lower-case stage name, variables in FROM declared as global ARGs,
// COPY --from naming an earlier stage, COPY and ADD with a source and a
// destination, and valid JSON in the exec form. Heredocs are not supported.
func ParseDockerfile(text string) (*Dockerfile, error) {
	d := &Dockerfile{GlobalArgs: map[string]string{}}
	lines := strings.Split(text, "\n")
	for i := 0; i < len(lines); i++ {
		start := i + 1
		line := strings.TrimSpace(lines[i])
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		// Join continuation lines; comment lines inside are dropped.
		for strings.HasSuffix(line, `\`) {
			line = strings.TrimSuffix(line, `\`)
			i++
			for i < len(lines) && strings.HasPrefix(strings.TrimSpace(lines[i]), "#") {
				i++
			}
			if i >= len(lines) {
				return nil, fmt.Errorf("line %d: continuation at the end of the file", start)
			}
			line += " " + strings.TrimSpace(lines[i])
		}
		ins, err := parseInstruction(start, line)
		if err != nil {
			return nil, err
		}
		if err := d.add(ins); err != nil {
			return nil, err
		}
	}
	if len(d.Stages) == 0 {
		return nil, fmt.Errorf("no FROM instruction")
	}
	return d, nil
}

func parseInstruction(line int, text string) (Instruction, error) {
	cmd, rest, _ := strings.Cut(text, " ")
	ins := Instruction{Line: line, Cmd: strings.ToUpper(cmd), Flags: map[string]string{}}
	if !knownInstructions[ins.Cmd] {
		return ins, fmt.Errorf("line %d: unknown instruction %q", line, cmd)
	}
	if strings.Contains(rest, "<<") && (ins.Cmd == "RUN" || ins.Cmd == "COPY") {
		return ins, fmt.Errorf("line %d: heredocs are not supported by this parser", line)
	}
	rest = strings.TrimSpace(rest)
	// Flags: --name or --name=value, before the arguments.
	for strings.HasPrefix(rest, "--") {
		var f string
		f, rest, _ = strings.Cut(rest, " ")
		rest = strings.TrimSpace(rest)
		name, value, _ := strings.Cut(strings.TrimPrefix(f, "--"), "=")
		if !knownFlags[ins.Cmd][name] {
			return ins, fmt.Errorf("line %d: %s does not take --%s", line, ins.Cmd, name)
		}
		ins.Flags[name] = value
	}
	ins.Rest = rest
	if strings.HasPrefix(rest, "[") && (ins.Cmd == "RUN" || ins.Cmd == "CMD" || ins.Cmd == "ENTRYPOINT" ||
		ins.Cmd == "SHELL" || ins.Cmd == "COPY" || ins.Cmd == "ADD" || ins.Cmd == "VOLUME") {
		if err := json.Unmarshal([]byte(rest), &ins.Args); err != nil {
			return ins, fmt.Errorf("line %d: %s: bad JSON array %s: %v", line, ins.Cmd, rest, err)
		}
		ins.JSON = true
	} else {
		ins.Args = strings.Fields(rest)
	}
	if len(ins.Args) == 0 && ins.Cmd != "CMD" && ins.Cmd != "ENTRYPOINT" {
		return ins, fmt.Errorf("line %d: %s needs arguments", line, ins.Cmd)
	}
	return ins, nil
}

func (d *Dockerfile) add(ins Instruction) error {
	switch ins.Cmd {
	case "FROM":
		return d.addStage(ins)
	case "ARG":
		if len(d.Stages) == 0 {
			for _, a := range ins.Args {
				k, v, _ := strings.Cut(a, "=")
				d.GlobalArgs[k] = v
			}
			return nil
		}
	default:
		if len(d.Stages) == 0 {
			return fmt.Errorf("line %d: %s before the first FROM (only ARG may come first)", ins.Line, ins.Cmd)
		}
	}
	st := d.Stages[len(d.Stages)-1]
	if ins.Cmd == "COPY" || ins.Cmd == "ADD" {
		if len(ins.Args) < 2 {
			return fmt.Errorf("line %d: %s needs a source and a destination", ins.Line, ins.Cmd)
		}
		if from, ok := ins.Flags["from"]; ok {
			src := d.Stage(from)
			if src == nil || src.Index >= st.Index {
				return fmt.Errorf("line %d: COPY --from=%s names no earlier stage", ins.Line, from)
			}
		}
	}
	st.Instructions = append(st.Instructions, ins)
	return nil
}

func (d *Dockerfile) addStage(ins Instruction) error {
	args := ins.Args
	st := &Stage{Index: len(d.Stages)}
	switch {
	case len(args) == 1:
	case len(args) == 3 && strings.EqualFold(args[1], "AS"):
		st.Name = strings.ToLower(args[2])
		if !stageName.MatchString(args[2]) {
			return fmt.Errorf("line %d: stage name %q must be lower case letters, digits, '-', '_' or '.'", ins.Line, args[2])
		}
		if d.Stage(st.Name) != nil {
			return fmt.Errorf("line %d: stage %q defined twice", ins.Line, st.Name)
		}
	default:
		return fmt.Errorf("line %d: want FROM image [AS name], got FROM %s", ins.Line, ins.Rest)
	}
	var missing []string
	st.Base = varRef.ReplaceAllStringFunc(args[0], func(m string) string {
		sub := varRef.FindStringSubmatch(m)
		name := sub[1] + sub[3]
		v, ok := d.GlobalArgs[name]
		if !ok {
			missing = append(missing, name)
		}
		return v
	})
	if len(missing) > 0 {
		return fmt.Errorf("line %d: FROM uses %s, not declared by an ARG before the first FROM", ins.Line, strings.Join(missing, ", "))
	}
	if st.Base == "" {
		return fmt.Errorf("line %d: FROM with an empty image", ins.Line)
	}
	d.Stages = append(d.Stages, st)
	return nil
}
