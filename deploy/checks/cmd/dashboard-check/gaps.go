package main

import (
	"encoding/json"
	"fmt"

	"github.com/grafana/grafana-foundation-sdk/go/cog"
	"github.com/grafana/grafana-foundation-sdk/go/cog/variants"
	"github.com/grafana/grafana-foundation-sdk/go/dashboard"
)

type rawPanel struct {
	Datasource  json.RawMessage   `json:"datasource"`
	Targets     []json.RawMessage `json:"targets"`
	FieldConfig json.RawMessage   `json:"fieldConfig"`
	Panels      []rawPanel        `json:"panels"` // a row's panels
}

func dsType(raw json.RawMessage) string {
	var ds struct {
		Type string `json:"type"`
	}
	_ = json.Unmarshal(raw, &ds) // absent, or already checked by the SDK's strict decode
	return ds.Type
}

// strictGaps strictly decodes what the SDK's Dashboard.UnmarshalJSONStrict
// (v0.0.22) decodes leniently or not at all:
//   - fieldConfig apart from defaults.custom: typos in defaults/overrides pass;
//   - targets without their own datasource: the strict decoder reads "targets"
//     before the panel's "datasource", so it has no type hint and keeps them
//     as unchecked maps.
func strictGaps(raw []byte) error {
	var d struct {
		Panels []rawPanel `json:"panels"`
	}
	if err := json.Unmarshal(raw, &d); err != nil {
		return err
	}
	var errs cog.BuildErrors
	var walk func(path string, panels []rawPanel)
	walk = func(path string, panels []rawPanel) {
		for i, p := range panels {
			at := fmt.Sprintf("%s[%d]", path, i)
			if len(p.FieldConfig) > 0 && string(p.FieldConfig) != "null" {
				var fc dashboard.FieldConfigSource
				if err := sdkErr(fc.UnmarshalJSONStrict(p.FieldConfig)); err != nil {
					errs = append(errs, cog.MakeBuildErrors(at+".fieldConfig", err)...)
				}
			}
			for j, t := range p.Targets {
				hint := dsType(p.Datasource)
				if own := dsType(t); own != "" {
					hint = own
				}
				if _, err := cog.StrictUnmarshalDataquery(t, hint); sdkErr(err) != nil {
					errs = append(errs, cog.MakeBuildErrors(fmt.Sprintf("%s.targets[%d]", at, j), err)...)
				}
			}
			walk(at+".panels", p.Panels)
		}
	}
	walk("panels", d.Panels)
	if len(errs) > 0 {
		return errs
	}
	return nil
}

// validatePanels runs Validate() on each panel's typed options and custom
// field config (Panel.Validate does not) and notes what the SDK cannot check.
func validatePanels(d dashboard.Dashboard) (notes []string, errs cog.BuildErrors) {
	var panels []dashboard.Panel
	for _, p := range d.Panels {
		if p.Panel != nil {
			panels = append(panels, *p.Panel)
		} else if p.RowPanel != nil {
			panels = append(panels, p.RowPanel.Panels...)
		}
	}
	type validator interface{ Validate() error }
	for _, p := range panels {
		title := ""
		if p.Title != nil {
			title = *p.Title
		}
		where := fmt.Sprintf("panel %q (%s)", title, p.Type)
		if _, ok := cog.ConfigForPanelcfgVariant(p.Type); !ok {
			notes = append(notes, where+": panel type unknown to the SDK, options not checked")
		}
		if v, ok := p.Options.(validator); ok {
			if err := sdkErr(v.Validate()); err != nil {
				errs = append(errs, cog.MakeBuildErrors(where+".options", err)...)
			}
		}
		if p.FieldConfig != nil {
			if v, ok := p.FieldConfig.Defaults.Custom.(validator); ok {
				if err := sdkErr(v.Validate()); err != nil {
					errs = append(errs, cog.MakeBuildErrors(where+".fieldConfig.defaults.custom", err)...)
				}
			}
		}
		for _, t := range p.Targets {
			if _, ok := t.(variants.UnknownDataquery); ok {
				notes = append(notes, where+": target of a datasource type unknown to the SDK, not checked")
			}
		}
	}
	return notes, errs
}
