package backup

// Progress is told how a long operation advances, in bytes. Calls come from one goroutine at a time, in the
// order Begin, Add..., End, for each phase.
type Progress interface {
	// Begin starts a phase, such as "disk0: reading", of total bytes.
	Begin(phase string, total int64)
	// Add reports n more bytes done.
	Add(n int64)
	// End closes the phase.
	End()
}

// noProgress is used when the caller passes none.
type noProgress struct{}

func (noProgress) Begin(string, int64) {}
func (noProgress) Add(int64)           {}
func (noProgress) End()                {}

func orNone(p Progress) Progress {
	if p == nil {
		return noProgress{}
	}
	return p
}
