package lbmap

// idAlloc hands out ids 1..limit next-fit: a freed id comes back only after
// the cursor has gone round, so an id is not reused while a datapath lookup
// that read it just before the delete might still follow it. The limit is
// twice the map's size, so every id is reused, but late.
type idAlloc struct {
	limit uint32
	next  uint32
	used  map[uint32]struct{}
}

func newIDAlloc(limit uint32) *idAlloc {
	if limit == 0 {
		limit = 1
	}
	return &idAlloc{limit: limit, next: 1, used: map[uint32]struct{}{}}
}

func (a *idAlloc) alloc() (uint32, bool) {
	if len(a.used) >= int(a.limit) {
		return 0, false
	}
	for {
		id := a.next
		a.next = id%a.limit + 1
		if _, ok := a.used[id]; !ok {
			a.used[id] = struct{}{}
			return id, true
		}
	}
}

// take marks an id found in the maps as used and moves the cursor past it.
func (a *idAlloc) take(id uint32) {
	a.used[id] = struct{}{}
	if id >= a.next && id <= a.limit {
		a.next = id%a.limit + 1
	}
}

func (a *idAlloc) release(id uint32) { delete(a.used, id) }

func idLimit(capacity int) uint32 {
	const maxLimit = 1 << 30
	if capacity <= 0 {
		return 1
	}
	if capacity > maxLimit/2 {
		return maxLimit
	}
	return uint32(2 * capacity)
}
