package engine

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestRecordingConverges(t *testing.T) {
	cases := []struct {
		name  string
		fresh []int
		want  bool
	}{
		{"too few rounds", []int{1000, 10, 0, 0, 0, 0, 0, 0, 0}, false},
		{"quiet for five rounds", []int{1000, 500, 200, 50, 20, 2, 2, 2, 2, 2}, true},
		// 5 rounds found 50 of 1820 pages: 2.7 %, still learning.
		{"still finding pages", []int{1000, 500, 200, 50, 20, 10, 10, 10, 10, 10}, false},
		{"a stream finds new pages every round", []int{500, 500, 500, 500, 500, 500, 500, 500, 500, 500, 500}, false},
		{"nothing written at all", make([]int, 12), false},
		// A burst of new pages in the last rounds (a new job) restarts it.
		{"a new job", []int{1000, 0, 0, 0, 0, 0, 0, 0, 0, 0, 300}, false},
	}
	for _, c := range cases {
		assert.Equal(t, c.want, converged(c.fresh), c.name)
	}
}
