package v1

import (
	"testing"

	"k8s.io/apimachinery/pkg/labels"
)

func TestLabelSelectorAsSelector(t *testing.T) {
	cases := []struct {
		name string
		sel  LabelSelector
		lbl  labels.Set
		want bool
	}{
		{"empty matches all", LabelSelector{}, labels.Set{"a": "b"}, true},
		{"matchLabels equal", LabelSelector{MatchLabels: map[string]LabelValue{"role": "frontend"}}, labels.Set{"role": "frontend"}, true},
		{"matchLabels differ", LabelSelector{MatchLabels: map[string]LabelValue{"role": "frontend"}}, labels.Set{"role": "backend"}, false},
		{"In", LabelSelector{MatchExpressions: []LabelSelectorRequirement{{Key: "tier", Operator: "In", Values: []LabelValue{"a", "b"}}}}, labels.Set{"tier": "b"}, true},
		{"NotIn", LabelSelector{MatchExpressions: []LabelSelectorRequirement{{Key: "tier", Operator: "NotIn", Values: []LabelValue{"a"}}}}, labels.Set{"tier": "a"}, false},
		{"Exists", LabelSelector{MatchExpressions: []LabelSelectorRequirement{{Key: "canary", Operator: "Exists"}}}, labels.Set{"canary": ""}, true},
		{"DoesNotExist", LabelSelector{MatchExpressions: []LabelSelectorRequirement{{Key: "canary", Operator: "DoesNotExist"}}}, labels.Set{"canary": "x"}, false},
		{"labels and expressions ANDed", LabelSelector{
			MatchLabels:      map[string]LabelValue{"role": "frontend"},
			MatchExpressions: []LabelSelectorRequirement{{Key: "canary", Operator: "DoesNotExist"}},
		}, labels.Set{"role": "frontend", "canary": "1"}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s, err := tc.sel.AsSelector()
			if err != nil {
				t.Fatal(err)
			}
			if got := s.Matches(tc.lbl); got != tc.want {
				t.Fatalf("Matches(%v) = %v, want %v", tc.lbl, got, tc.want)
			}
		})
	}
}

func TestLabelSelectorBadOperator(t *testing.T) {
	_, err := LabelSelector{MatchExpressions: []LabelSelectorRequirement{{Key: "a", Operator: "Equals"}}}.AsSelector()
	if err == nil {
		t.Fatal("want an error for an unknown operator")
	}
}
