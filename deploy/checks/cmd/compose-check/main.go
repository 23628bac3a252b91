// compose-check loads one or more Compose files the way `docker compose config`
// does (compose-go v2: interpolation, schema validation, normalisation and
// consistency checks), prints the normalised project, and exits 1 on any error.
//
// Usage: compose-check [-q] [-json] [-strict-env] [-p NAME] [-env-file F]... FILE...
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/sirupsen/logrus"
)

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(v string) error { *m = append(*m, v); return nil }

// warnings collects compose-go's logrus warnings (e.g. `"X" variable is not set`).
type warnings []string

func (w *warnings) Levels() []logrus.Level { return []logrus.Level{logrus.WarnLevel} }
func (w *warnings) Fire(e *logrus.Entry) error {
	*w = append(*w, e.Message)
	return nil
}

func main() {
	quiet := flag.Bool("q", false, "only validate, print nothing on success")
	asJSON := flag.Bool("json", false, "print the normalised project as JSON instead of YAML")
	strictEnv := flag.Bool("strict-env", false, "treat loader warnings (e.g. unset variables) as errors")
	name := flag.String("p", "", "project name (default: the files' name: key, else the directory name)")
	var envFiles multi
	flag.Var(&envFiles, "env-file", "extra env file for interpolation (repeatable; default: .env beside the first file)")
	flag.Parse()
	if flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: compose-check [-q] [-json] [-strict-env] [-p NAME] [-env-file F]... FILE...")
		os.Exit(2)
	}
	var warns warnings
	logrus.AddHook(&warns)

	opts := []cli.ProjectOptionsFn{
		cli.WithOsEnv,                 // process environment wins, as in docker compose
		cli.WithEnvFiles(envFiles...), // none given: .env in the working dir
		cli.WithDotEnv,                // merge the env files into the interpolation env
		cli.WithInterpolation(true),   // ${VAR} / ${VAR:?err} / ${VAR:-default}
		cli.WithNormalization(true),   // default networks, resolved build paths, ...
		cli.WithConsistency(true),     // unknown services / networks / volumes / secrets ...
		cli.WithResolvedPaths(true),
	}
	if *name != "" {
		opts = append(opts, cli.WithName(*name))
	}
	po, err := cli.NewProjectOptions(flag.Args(), opts...)
	if err != nil {
		fail(err)
	}
	project, err := po.LoadProject(context.Background()) // schema validation is on by default
	if err != nil {
		fail(err)
	}
	if *strictEnv && len(warns) > 0 {
		fail(fmt.Errorf("warnings treated as errors:\n  %s", strings.Join(warns, "\n  ")))
	}
	if *quiet {
		return
	}
	var out []byte
	if *asJSON {
		out, err = project.MarshalJSON()
	} else {
		out, err = project.MarshalYAML()
	}
	if err != nil {
		fail(err)
	}
	os.Stdout.Write(out)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "compose-check: error:", err)
	os.Exit(1)
}
