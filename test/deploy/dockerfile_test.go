package deploy

import (
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// TestDockerfile: the Dockerfile parses; a golang builder of the go.mod's
// Go version builds ./cmd/... statically; the final stage is distroless
// static (or scratch) and copies from the builder every binary the
// manifests run, to the path they run it from; the builder copies every
// package the binaries import.
func TestDockerfile(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(root, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	d, err := ParseDockerfile(string(b))
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Stages) < 2 {
		t.Fatalf("want a multi-stage build, got %d stage(s)", len(d.Stages))
	}
	build := d.Stage("build")
	if build == nil || !strings.HasPrefix(build.Base, "golang:") {
		t.Fatalf("want a stage named build FROM golang, got %+v", build)
	}
	gomod, _ := os.ReadFile(filepath.Join(root, "go.mod"))
	goVersion := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindStringSubmatch(string(gomod))
	if goVersion == nil || !strings.HasPrefix(strings.TrimPrefix(build.Base, "golang:"), goVersion[1]) {
		t.Errorf("builder %s does not match go.mod's go %v", build.Base, goVersion)
	}
	var goBuild string
	var copied []string
	for _, ins := range build.Instructions {
		switch ins.Cmd {
		case "RUN":
			if strings.Contains(ins.Rest, "go build") {
				goBuild = ins.Rest
			}
		case "COPY":
			copied = append(copied, ins.Args[:len(ins.Args)-1]...)
		}
	}
	for _, want := range []string{"CGO_ENABLED=0", "-o /out/", "./cmd/..."} {
		if !strings.Contains(goBuild, want) {
			t.Errorf("builder's go build %q lacks %s", goBuild, want)
		}
	}

	final := d.Final()
	if !strings.HasPrefix(final.Base, "gcr.io/distroless/static") && final.Base != "scratch" {
		t.Errorf("final stage FROM %s, want distroless static or scratch", final.Base)
	}
	// Paths the final image holds, copied from the builder's /out/.
	shipped := map[string]bool{}
	for _, ins := range final.Instructions {
		if ins.Cmd != "COPY" {
			continue
		}
		if ins.Flags["from"] != "build" {
			t.Errorf("line %d: final stage copies from %q, want the build stage", ins.Line, ins.Flags["from"])
		}
		dst := ins.Args[len(ins.Args)-1]
		for _, src := range ins.Args[:len(ins.Args)-1] {
			if !strings.HasPrefix(src, "/out/") {
				t.Errorf("line %d: copies %s, not a build output", ins.Line, src)
			}
			p := dst
			if strings.HasSuffix(dst, "/") {
				p = path.Join(dst, path.Base(src))
			}
			shipped[p] = true
		}
	}
	ds, dep := daemonSet(t), deployment(t)
	var commands []string
	for _, c := range append(append(ds.Spec.Template.Spec.Containers, ds.Spec.Template.Spec.InitContainers...), dep.Spec.Template.Spec.Containers...) {
		commands = append(commands, c.Command[0])
	}
	for _, cmd := range commands {
		if !shipped[cmd] {
			t.Errorf("the manifests run %s, which the image does not ship (it ships %v)", cmd, shipped)
		}
		if _, err := os.Stat(filepath.Join(root, "cmd", path.Base(cmd), "main.go")); err != nil {
			t.Errorf("the image ships %s, but ./cmd/%s is no command", cmd, path.Base(cmd))
		}
	}

	// go list: every package of this module the binaries import lies in a
	// directory the builder copies.
	list := exec.Command("go", "list", "-deps", "./cmd/...")
	list.Dir = root
	out, err := list.Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	const module = "github.com/egressnat/egressnat/"
	for _, pkg := range strings.Fields(string(out)) {
		rel, ok := strings.CutPrefix(pkg, module)
		if !ok {
			continue
		}
		if !slices.ContainsFunc(copied, func(c string) bool { return strings.HasPrefix(rel+"/", strings.TrimSuffix(c, "/")+"/") }) {
			t.Errorf("the binaries import %s, which the build stage does not COPY", rel)
		}
	}
}

// TestParseDockerfileRejects: the parser catches the mistakes that break a
// build.
func TestParseDockerfileRejects(t *testing.T) {
	for _, tc := range []struct{ name, text, want string }{
		{"unknown instruction", "FROM scratch\nCOPPY a b\n", `unknown instruction "COPPY"`},
		{"no from", "RUN true\n", "before the first FROM"},
		{"empty", "# nothing\n", "no FROM"},
		{"undefined stage", "FROM golang:1.26 AS build\nFROM scratch\nCOPY --from=builder /out/x /x\n", "names no earlier stage"},
		{"later stage", "FROM scratch AS a\nCOPY --from=b /x /x\nFROM scratch AS b\n", "names no earlier stage"},
		{"duplicate stage", "FROM scratch AS a\nFROM scratch AS a\n", "defined twice"},
		{"bad stage name", "FROM scratch AS Build!\n", "stage name"},
		{"bad from", "FROM a b\n", "want FROM image [AS name]"},
		{"undeclared arg", "FROM golang:${GO}\n", "GO, not declared"},
		{"copy one arg", "FROM scratch\nCOPY x\n", "a source and a destination"},
		{"bad json", "FROM scratch\nENTRYPOINT [\"/x\"\n", "bad JSON"},
		{"bad flag", "FROM scratch\nCOPY --form=a x y\n", "does not take --form"},
		{"dangling continuation", "FROM scratch\nRUN a \\", "continuation at the end"},
	} {
		_, err := ParseDockerfile(tc.text)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want an error with %q", tc.name, err, tc.want)
		}
	}
	d, err := ParseDockerfile("ARG V=1\nFROM golang:${V} AS b\nRUN a \\\n  # comment\n  && b\nFROM scratch\nCOPY --from=0 --chmod=755 /o /o\nCOPY --from=b [\"/p\", \"/q\"]\n")
	if err != nil {
		t.Fatal(err)
	}
	if d.Stages[0].Base != "golang:1" || d.Stages[0].Instructions[0].Rest != "a  && b" || len(d.Final().Instructions) != 2 ||
		!d.Final().Instructions[1].JSON {
		t.Errorf("parsed: %+v %+v", d.Stages[0], d.Final())
	}
}
