# The benchmark guest: 64-bit long mode, ring 3, no interrupts, no privileged instructions.
#
# It fills the data pages with a pattern (every 4th page left zero), then touches pages
# forever in a pseudo-random (or sequential, or hot-set) order, verifying every word of each
# page it reads and rewriting one page in 2^write_shift with the next generation (or, with a
# write interval, the page it touches once that many TSC ticks passed since the last write:
# a paced dirty rate). Every
# report_interval TSC ticks it stores its counters and writes to an unbacked guest-physical
# address (an MMIO exit: port I/O is blocked in ring 3 under kvm-pvm, and an MMIO exit needs
# no ring-0 code at all).
#
# With a free percentage, the fill leaves about that share of the data pages free: they get
# old bytes (a generation nobody expects), their bit is set in the free bitmap (one bit per
# data page, at free_map, past the data pages), and the touch loop never picks them, as a
# guest's allocator would not hand out free memory. The VMM reads the bitmap when it pauses.
#
# Page content, for page index p (guest-physical address >> 12) and generation g:
#   word[0] = g << 40 | p;  word[i] = (word[0] + i) * K ^ seed  (i = 1..511)
# A page with p % 4 == 0 that was never written is all zero.
#
# Register use: rbx this vCPU's block (its parameters and counters: the VMM sets it at boot,
# 0 for vCPU 0), r15 seed, r14 data_start_page, r13 data_pages (this vCPU's own range of
# data pages), r12 rng state, r11 last report tsc, r10 sequential cursor.

    .set PARAMS,          0x100
    .set P_DATA_START,    PARAMS + 0x00   # first data page index
    .set P_DATA_PAGES,    PARAMS + 0x08
    .set P_SEED,          PARAMS + 0x10
    .set P_WORKLOAD,      PARAMS + 0x18   # 0 random, 1 sequential, 2 hot (80% to 10%)
    .set P_INTERVAL,      PARAMS + 0x20   # report interval in TSC ticks
    .set P_MMIO,          PARAMS + 0x28   # report address (no memslot behind it)
    .set P_WRITE_SHIFT,   PARAMS + 0x30   # rewrite one touched page in 2^n
    .set P_STALL_TSC,     PARAMS + 0x38   # a touch at least this long is a stall
    .set P_FILL,          PARAMS + 0x40   # 1: fill before touching
    .set P_WRITE_INTERVAL, PARAMS + 0x48  # >0: write a page every this many TSC ticks
    .set P_FREE_PCT,      PARAMS + 0x50   # % of data pages the fill leaves free
    .set P_FREE_MAP,      PARAMS + 0x58   # address of the free bitmap

    .set COUNTERS,        0x200
    .set C_PHASE,         COUNTERS + 0x00 # 0 filling, 1 touching
    .set C_TOUCHES,       COUNTERS + 0x08
    .set C_VERIFIED,      COUNTERS + 0x10
    .set C_MISMATCHES,    COUNTERS + 0x18
    .set C_MAX_STALL,     COUNTERS + 0x20
    .set C_STALL_SUM,     COUNTERS + 0x28
    .set C_STALLS,        COUNTERS + 0x30
    .set C_TSC,           COUNTERS + 0x38
    .set C_TOUCH_TSC_SUM, COUNTERS + 0x40
    .set C_FILLED,        COUNTERS + 0x48
    .set C_BAD_PAGE,      COUNTERS + 0x50 # last page that failed verification
    .set C_WIN_MAX,       COUNTERS + 0x58 # longest touch since the last report
    .set C_LAST_WRITE,    COUNTERS + 0x60 # TSC of the last paced write
    .set C_HIST,          COUNTERS + 0x100 # 64 buckets: touches by log2(TSC ticks)

    .set K, 0x5851F42D
    .set MASK40, 0xFFFFFFFFFF

    .code64
    .text
    .globl _start
_start:
    mov P_SEED(%rbx), %r15
    mov P_DATA_START(%rbx), %r14
    mov P_DATA_PAGES(%rbx), %r13
    mov %r15, %r12
    xor %rbx, %r12              # each vCPU its own sequence (vCPU 0's block is at 0)
    or $1, %r12
    xor %r10, %r10
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, %r11
    cmpq $0, P_FILL(%rbx)
    je touch_loop

    # ---- fill: every page but each 4th gets generation 0 ----
    movq $0, C_PHASE(%rbx)
    mov %r14, %rsi              # page index
    mov %r14, %r9
    add %r13, %r9               # end page
fill_next:
    cmp %r9, %rsi
    jae fill_done
    test $3, %rsi
    jz fill_skip
    cmpq $0, P_FREE_PCT(%rbx)
    je 6f
    call next_random            # free with probability free_pct %
    shr $32, %rax
    xor %rdx, %rdx
    mov $100, %rcx
    div %rcx                    # rdx = random % 100
    cmp P_FREE_PCT(%rbx), %rdx
    jae 6f
    mov %rsi, %rax
    sub %r14, %rax
    mov P_FREE_MAP(%rbx), %rdx
    bts %rax, (%rdx)            # free: in the bitmap, with old bytes
    mov $0xFFFF, %rax
    shl $40, %rax
    or %rsi, %rax
    call write_page
    jmp fill_skip
6:  mov %rsi, %rax              # word0 = p (g = 0)
    call write_page
fill_skip:
    inc %rsi
    incq C_FILLED(%rbx)
    call maybe_report
    jmp fill_next
fill_done:
    movq $0, P_FILL(%rbx)             # a restored guest must not fill again

touch_loop:
    movq $1, C_PHASE(%rbx)
    call pick_page              # rsi = page index
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, %r8               # t0
    call verify_page
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, %rcx
    sub %r8, %rcx               # touch time
    add %rcx, C_TOUCH_TSC_SUM(%rbx)
    bsr %rcx, %rax
    jz 4f
    incq C_HIST(%rbx,%rax,8)
4:
    cmp C_MAX_STALL(%rbx), %rcx
    jbe 5f
    mov %rcx, C_MAX_STALL(%rbx)
5:  cmp C_WIN_MAX(%rbx), %rcx
    jbe 1f
    mov %rcx, C_WIN_MAX(%rbx)
1:  cmp P_STALL_TSC(%rbx), %rcx
    jb 2f
    add %rcx, C_STALL_SUM(%rbx)
    incq C_STALLS(%rbx)
2:  incq C_TOUCHES(%rbx)
    incq C_VERIFIED(%rbx)
    mov P_WRITE_INTERVAL(%rbx), %rax
    test %rax, %rax
    jz 6f
    # paced: rewrite this page if the interval passed since the last write (at once if the
    # TSC went back, as after a restore elsewhere)
    lea (%r8,%rcx), %rdx        # now: the end of this touch
    mov %rdx, %rcx
    sub C_LAST_WRITE(%rbx), %rcx
    cmp %rax, %rcx
    jb 3f
    mov %rdx, C_LAST_WRITE(%rbx)
    jmp 7f
    # rewrite one page in 2^write_shift
6:  mov C_TOUCHES(%rbx), %rax
    mov P_WRITE_SHIFT(%rbx), %rcx
    mov $1, %rdx
    shl %cl, %rdx
    dec %rdx
    test %rdx, %rax
    jnz 3f
7:  mov %rsi, %rdi
    shl $12, %rdi
    mov (%rdi), %rax
    shr $40, %rax
    inc %rax
    shl $40, %rax
    or %rsi, %rax               # word0 = (g+1) << 40 | p
    call write_page
3:  call maybe_report
    jmp touch_loop

# rsi = page index, rax = word0: writes the page's pattern. Clobbers rax, rcx, rdx, rdi.
write_page:
    mov %rsi, %rdi
    shl $12, %rdi
    mov %rax, (%rdi)
    mov $1, %rcx
1:  lea (%rax,%rcx), %rdx
    imul $K, %rdx, %rdx
    xor %r15, %rdx
    mov %rdx, (%rdi,%rcx,8)
    inc %rcx
    cmp $512, %rcx
    jne 1b
    ret

# rsi = page index: checks every word; counts a mismatch. Clobbers rax, rcx, rdx, rdi.
verify_page:
    mov %rsi, %rdi
    shl $12, %rdi
    mov (%rdi), %rax
    test %rax, %rax
    jnz 2f
    test $3, %rsi               # an all-zero page must be a never-written 4th page
    jnz bad_page
    xor %rdx, %rdx
    mov $1, %rcx
1:  or (%rdi,%rcx,8), %rdx
    inc %rcx
    cmp $512, %rcx
    jne 1b
    test %rdx, %rdx
    jnz bad_page
    ret
2:  mov $MASK40, %rdx
    and %rax, %rdx
    cmp %rdx, %rsi
    jne bad_page
    mov $1, %rcx
3:  lea (%rax,%rcx), %rdx
    imul $K, %rdx, %rdx
    xor %r15, %rdx
    cmp (%rdi,%rcx,8), %rdx
    jne bad_page
    inc %rcx
    cmp $512, %rcx
    jne 3b
    ret
bad_page:
    incq C_MISMATCHES(%rbx)
    mov %rsi, C_BAD_PAGE(%rbx)
    ret

# Returns the next page index that is not free in rsi. Clobbers rax, rdx, rcx.
pick_page:
    call pick_any
    cmpq $0, P_FREE_PCT(%rbx)
    je 1f
    mov %rsi, %rax
    sub %r14, %rax
    mov P_FREE_MAP(%rbx), %rdx
    bt %rax, (%rdx)
    jc pick_page
1:  ret

# Returns the next page index in rsi. Clobbers rax, rdx, rcx.
pick_any:
    cmpq $1, P_WORKLOAD(%rbx)
    je 2f
    call next_random
    mov %r13, %rcx              # range: all data pages
    cmpq $2, P_WORKLOAD(%rbx)
    jne 1f
    mov %r12, %rax
    shr $56, %rax
    cmp $205, %rax              # 80% of touches ...
    jae 1f
    mov %r13, %rax              # ... go to the first 10% of pages
    xor %rdx, %rdx
    mov $10, %rcx
    div %rcx
    mov %rax, %rcx
    test %rcx, %rcx
    jnz 1f
    mov $1, %rcx
1:  call next_random
    mul %rcx                    # rdx = floor(rng * range / 2^64)
    mov %rdx, %rsi
    add %r14, %rsi
    ret
2:  mov %r10, %rsi
    add %r14, %rsi
    inc %r10
    cmp %r13, %r10
    jb 3f
    xor %r10, %r10
3:  ret

# xorshift64 in r12; returns it in rax.
next_random:
    mov %r12, %rax
    shl $13, %rax
    xor %rax, %r12
    mov %r12, %rax
    shr $7, %rax
    xor %rax, %r12
    mov %r12, %rax
    shl $17, %rax
    xor %rax, %r12
    mov %r12, %rax
    ret

# Reports when report_interval TSC ticks have passed. Preserves every register but flags.
maybe_report:
    push %rax
    push %rdx
    push %rcx
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, %rcx
    sub %r11, %rcx
    cmp P_INTERVAL(%rbx), %rcx
    jb 1f
    mov %rax, %r11
    mov %rax, C_TSC(%rbx)
    mov P_MMIO(%rbx), %rdx
    mov %rax, (%rdx)            # MMIO exit: the VMM reads the counters
    movq $0, C_WIN_MAX(%rbx)
1:  pop %rcx
    pop %rdx
    pop %rax
    ret
