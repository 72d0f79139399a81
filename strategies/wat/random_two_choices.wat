;; random_two_choices.wat: "power of two random choices", written by hand in WAT.
;;
;; The smallest complete Harbor strategy: no compiler, no bindings generator, no SDK. It
;; shows what a strategy component is underneath: a plain core wasm module (memory, an
;; allocator, four functions over i32/i64 numbers) plus a thin component layer that gives
;; those functions their WIT types (`canon lift`). Build it with `strategies/wat/build.sh`,
;; which writes `strategies/random_two_choices.wasm`.
;;
;; The algorithm, for each `pick`:
;;   1. count the healthy backends (state 0); none healthy -> return `none`;
;;   2. use the host's per-pick random `seed` to choose two different healthy backends;
;;   3. return the one with fewer active connections (the first of the two on a tie).
;; It keeps no state between calls, so it is safe to run in several instances at once.
;;
;; ---------------------------------------------------------------------------------------
;; How the canonical ABI maps this world onto core wasm
;; ---------------------------------------------------------------------------------------
;; Core wasm only knows i32/i64/f32/f64. The canonical ABI "flattens" each WIT parameter
;; list into core parameters, in order:
;;
;;   u8/u16/u32/s32/bool/enum  -> i32        (a u16 arrives zero-extended in an i32)
;;   u64/s64                   -> i64
;;   string, list<T>           -> i32 pointer, i32 length (length in elements; for a
;;                                string, in bytes of UTF-8)
;;   record / tuple            -> the flattenings of its fields, one after another
;;   variant / option / result -> i32 discriminant, then the cases' payloads "joined"
;;                                position by position: the same type stays, i32 with
;;                                i64 becomes i64, and a shorter case pads with zeros.
;;
;; If the flat parameters number more than 16, they are passed in memory instead (not
;; the case here). If the flat RESULTS number more than 1, the core function instead
;; returns one i32: a pointer to the result laid out in its linear memory (the "return
;; area"), which the host reads after the call.
;;
;; The exports of this world therefore flatten to:
;;
;;   init(config: string) -> result<strategy-info, string>
;;     params:  (i32 config-ptr, i32 config-len)
;;     result:  4 flat values (i32 tag + join of [i32 i32 i32] and [i32 i32]) > 1, so
;;              (result i32) = pointer to a 16-byte, 4-aligned return area:
;;                byte  0     tag: 0 = ok, 1 = err
;;                bytes 4..8  ok: name pointer      | err: message pointer
;;                bytes 8..12 ok: name length       | err: message length
;;                byte  12    ok: wants-reports (0/1)
;;
;;   set-backends(generation: u64, backends: list<backend-info>)
;;     params:  (i64 generation, i32 list-ptr, i32 list-len); no result.
;;     Each backend-info is 16 bytes in memory: index u32 @0, address pointer @4,
;;     address length @8, weight u32 @12.
;;
;;   pick(conn: connection, stats: list<u32>) -> option<u32>
;;     connection = { sequence: u64, seed: u64, client-ip: ip-address, client-port: u16,
;;                    attempt: u32 }
;;     ip-address = variant { ipv4(u32), ipv6(tuple<u64, u64>) } flattens to
;;                  i32 tag, then join([i32], [i64 i64]) = [i64 i64]: for ipv4 the u32
;;                  sits in the low half of the first i64 (use i32.wrap_i64) and the
;;                  second i64 is 0; for ipv6 they are the high and low 64-bit halves.
;;     params:  (i64 sequence, i64 seed, i32 ip-tag, i64 ip-a, i64 ip-b,
;;               i32 client-port, i32 attempt, i32 stats-ptr, i32 stats-len)  ; 9 values
;;     result:  option<u32> is 2 flat values (i32 tag, i32 value) > 1, so
;;              (result i32) = pointer to an 8-byte, 4-aligned return area:
;;                byte 0      tag: 0 = none, 1 = some
;;                bytes 4..8  the u32 index (only read when tag = 1)
;;
;;   report(outcome: connection-outcome)
;;     params:  (i64 sequence, i32 backend, i32 connected, i32 connect-micros,
;;               i64 duration-millis, i64 bytes-to-backend, i64 bytes-to-client)
;;     no result.
;;
;; Memory: to pass a string or list INTO the component, the host first calls the
;; component's `cabi_realloc(old-ptr, old-size, align, new-size) -> ptr` to get space in
;; the component's memory, copies the data there, then calls the export with the pointer.
;; So any export taking a string or list needs `(memory ...)` and `(realloc ...)` in its
;; `canon lift`, and one with strings also `string-encoding=utf8`. This module uses a bump
;; allocator and rewinds it at the end of every call: nothing it is given is kept.
;; Results live in fixed places in memory (set up by data segments), so no `post-return`
;; function is needed to free them.
;;
;; Component shape: the world `use`s types from the interface `harbor:strategy/types`, so
;; the component IMPORTS that interface as an instance that carries only type exports
;; (no functions: the host provides nothing), then re-imports each used type by its plain
;; name, which is how wit-component (and so `cargo xtask build`) encodes a world-level
;; `use`. `wasm-tools component wit` on the result prints the world back.

(component
  ;; -------------------------------------------------------------------------------------
  ;; 1. The types, imported exactly as wit-component encodes `use types.{...}`.
  ;; -------------------------------------------------------------------------------------
  (import "harbor:strategy/types@0.1.0" (instance $types
    (type $backend-state' (enum "healthy" "cooling-down" "draining" "unhealthy"))
    (export "backend-state" (type (eq $backend-state')))
    (type $backend-info' (record (field "index" u32) (field "address" string) (field "weight" u32)))
    (export "backend-info" (type (eq $backend-info')))
    (type $ipv6' (tuple u64 u64))
    (type $ip-address' (variant (case "ipv4" u32) (case "ipv6" $ipv6')))
    (export "ip-address" (type $ip-address (eq $ip-address')))
    ;; A record that uses another named type refers to the EXPORTED name ($ip-address).
    (type $connection' (record
      (field "sequence" u64)
      (field "seed" u64)
      (field "client-ip" $ip-address)
      (field "client-port" u16)
      (field "attempt" u32)))
    (export "connection" (type (eq $connection')))
    (type $strategy-info' (record (field "name" string) (field "wants-reports" bool)))
    (export "strategy-info" (type (eq $strategy-info')))
    (type $connection-outcome' (record
      (field "sequence" u64)
      (field "backend" u32)
      (field "connected" bool)
      (field "connect-micros" u32)
      (field "duration-millis" u64)
      (field "bytes-to-backend" u64)
      (field "bytes-to-client" u64)))
    (export "connection-outcome" (type (eq $connection-outcome')))
  ))
  (alias export $types "backend-state" (type $backend-state'))
  (import "backend-state" (type $backend-state (eq $backend-state')))
  (alias export $types "backend-info" (type $backend-info'))
  (import "backend-info" (type $backend-info (eq $backend-info')))
  (alias export $types "ip-address" (type $ip-address'))
  (import "ip-address" (type $ip-address (eq $ip-address')))
  (alias export $types "connection" (type $connection'))
  (import "connection" (type $connection (eq $connection')))
  (alias export $types "strategy-info" (type $strategy-info'))
  (import "strategy-info" (type $strategy-info (eq $strategy-info')))
  (alias export $types "connection-outcome" (type $connection-outcome'))
  (import "connection-outcome" (type $connection-outcome (eq $connection-outcome')))

  ;; -------------------------------------------------------------------------------------
  ;; 2. The core module: all the logic, in plain core wasm.
  ;; -------------------------------------------------------------------------------------
  (core module $m
    ;; One 64 KiB page to start; the allocator grows it when the host passes more data.
    ;; Memory map:   16..24  pick's return area
    ;;               32..48  init's return area (constant, see the data segment)
    ;;               64..71  the bytes of the name "wat-p2c"
    ;;             1024..    heap for the host's cabi_realloc calls (rewound every call)
    (memory (export "memory") 1)

    (global $heap_base i32 (i32.const 1024))
    (global $heap (mut i32) (i32.const 1024))

    ;; init's answer, ok(strategy-info { name: "wat-p2c", wants-reports: false }), laid out
    ;; as the canonical ABI expects (all numbers little-endian):
    (data (i32.const 32)
      "\00\00\00\00"   ;; @0  tag 0 = ok (1 byte, then 3 bytes of padding)
      "\40\00\00\00"   ;; @4  name pointer = 64
      "\07\00\00\00"   ;; @8  name length = 7 bytes
      "\00\00\00\00")  ;; @12 wants-reports = false (1 byte, then padding)
    (data (i32.const 64) "wat-p2c")

    ;; cabi_realloc(old-ptr, old-size, align, new-size) -> ptr: a bump allocator.
    ;; The host only ever calls it as (0, 0, align, size) to get fresh space for an argument,
    ;; but a correct realloc also moves old data, so it does (memory.copy).
    (func $realloc (export "cabi_realloc")
      (param $old_ptr i32) (param $old_size i32) (param $align i32) (param $new_size i32)
      (result i32)
      (local $ptr i32) (local $end i32) (local $pages_needed i32)
      ;; ptr = heap rounded up to a multiple of align (align is a power of two)
      (local.set $ptr
        (i32.and
          (i32.add (global.get $heap) (i32.sub (local.get $align) (i32.const 1)))
          (i32.sub (i32.const 0) (local.get $align))))
      (local.set $end (i32.add (local.get $ptr) (local.get $new_size)))
      ;; wrapped past 4 GiB: no such memory can exist
      (if (i32.lt_u (local.get $end) (local.get $ptr)) (then unreachable))
      ;; grow the memory if `end` lies past its last byte
      (local.set $pages_needed
        (i32.add (i32.shr_u (i32.sub (local.get $end) (i32.const 1)) (i32.const 16)) (i32.const 1)))
      (if (i32.gt_u (local.get $pages_needed) (memory.size))
        (then
          (if (i32.eq (memory.grow (i32.sub (local.get $pages_needed) (memory.size))) (i32.const -1))
            (then unreachable))))
      (if (local.get $old_size)
        (then
          (memory.copy (local.get $ptr) (local.get $old_ptr)
            (select (local.get $old_size) (local.get $new_size)
              (i32.lt_u (local.get $old_size) (local.get $new_size))))))
      (global.set $heap (local.get $end))
      (local.get $ptr))

    ;; Forget everything the host allocated for this call's arguments.
    (func $rewind (global.set $heap (global.get $heap_base)))

    ;; init: (i32 config-ptr, i32 config-len) -> i32 return-area pointer.
    ;; The config string is ignored; the answer is the constant prepared at address 32.
    (func (export "init") (param $config_ptr i32) (param $config_len i32) (result i32)
      (call $rewind)
      (i32.const 32))

    ;; set-backends: (i64 generation, i32 list-ptr, i32 list-len). Nothing to remember:
    ;; this strategy needs only the per-pick stats.
    (func (export "set-backends") (param $generation i64) (param $list_ptr i32) (param $list_len i32)
      (call $rewind))

    ;; The state of backend i: stats[4*i + 1], at byte offset 16*i + 4.
    (func $state (param $stats i32) (param $i i32) (result i32)
      (i32.load offset=4 (i32.add (local.get $stats) (i32.shl (local.get $i) (i32.const 4)))))

    ;; The active connections of backend i: stats[4*i + 0], at byte offset 16*i.
    (func $active (param $stats i32) (param $i i32) (result i32)
      (i32.load (i32.add (local.get $stats) (i32.shl (local.get $i) (i32.const 4)))))

    ;; The index of the k-th (from 0) healthy backend among the first n.
    (func $nth_healthy (param $stats i32) (param $n i32) (param $k i32) (result i32)
      (local $i i32)
      (block $done
        (loop $next
          (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
          (if (i32.eqz (call $state (local.get $stats) (local.get $i)))
            (then
              (if (i32.eqz (local.get $k)) (then (return (local.get $i))))
              (local.set $k (i32.sub (local.get $k) (i32.const 1)))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $next)))
      unreachable)  ;; callers only ask for k < the number of healthy backends

    ;; pick: the nine flat parameters of (conn: connection, stats: list<u32>), and an i32
    ;; pointer to the option<u32> answer.
    (func (export "pick")
      (param $sequence i64) (param $seed i64)
      (param $ip_tag i32) (param $ip_a i64) (param $ip_b i64)
      (param $client_port i32) (param $attempt i32)
      (param $stats i32) (param $stats_len i32)
      (result i32)
      (local $n i32) (local $i i32) (local $healthy i32)
      (local $rank_a i32) (local $rank_b i32) (local $a i32) (local $b i32)
      ;; n backends, four u32 each (any incomplete last group is ignored)
      (local.set $n (i32.shr_u (local.get $stats_len) (i32.const 2)))
      ;; count the healthy ones
      (block $counted
        (loop $count
          (br_if $counted (i32.ge_u (local.get $i) (local.get $n)))
          (if (i32.eqz (call $state (local.get $stats) (local.get $i)))
            (then (local.set $healthy (i32.add (local.get $healthy) (i32.const 1)))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $count)))
      (call $rewind)  ;; the stats stay readable: nothing else writes to the heap this call
      (if (i32.eqz (local.get $healthy))
        (then
          (i32.store8 (i32.const 16) (i32.const 0))  ;; tag 0 = none
          (return (i32.const 16))))
      ;; first choice: the low 32 bits of the seed, modulo the number of healthy backends
      (local.set $rank_a (i32.rem_u (i32.wrap_i64 (local.get $seed)) (local.get $healthy)))
      ;; second choice: a different healthy backend from the high 32 bits (when there is one)
      (local.set $rank_b (local.get $rank_a))
      (if (i32.gt_u (local.get $healthy) (i32.const 1))
        (then
          (local.set $rank_b
            (i32.rem_u
              (i32.wrap_i64 (i64.shr_u (local.get $seed) (i64.const 32)))
              (i32.sub (local.get $healthy) (i32.const 1))))
          (if (i32.ge_u (local.get $rank_b) (local.get $rank_a))
            (then (local.set $rank_b (i32.add (local.get $rank_b) (i32.const 1)))))))
      (local.set $a (call $nth_healthy (local.get $stats) (local.get $n) (local.get $rank_a)))
      (local.set $b (call $nth_healthy (local.get $stats) (local.get $n) (local.get $rank_b)))
      ;; keep the less loaded of the two
      (if (i32.lt_u (call $active (local.get $stats) (local.get $b))
                    (call $active (local.get $stats) (local.get $a)))
        (then (local.set $a (local.get $b))))
      (i32.store8 (i32.const 16) (i32.const 1))   ;; tag 1 = some
      (i32.store (i32.const 20) (local.get $a))   ;; the payload, at offset 4
      (i32.const 16))

    ;; report: the seven flat fields of connection-outcome. Never called, since init says
    ;; wants-reports: false, but the world requires the export.
    (func (export "report")
      (param $sequence i64) (param $backend i32) (param $connected i32)
      (param $connect_micros i32) (param $duration_millis i64)
      (param $bytes_to_backend i64) (param $bytes_to_client i64))
  )

  ;; -------------------------------------------------------------------------------------
  ;; 3. Instantiate the core module and lift its functions to the world's WIT types.
  ;; -------------------------------------------------------------------------------------
  (core instance $i (instantiate $m))
  (alias core export $i "memory" (core memory $memory))
  (alias core export $i "cabi_realloc" (core func $realloc))

  ;; init: a string comes in, and a string comes out: memory, realloc and UTF-8.
  (type $init-result (result $strategy-info (error string)))
  (func $init (param "config" string) (result $init-result)
    (canon lift (core func $i "init") (memory $memory) (realloc $realloc) string-encoding=utf8))
  (export "init" (func $init))

  ;; set-backends: a list of records holding strings.
  (type $backend-list (list $backend-info))
  (func $set-backends (param "generation" u64) (param "backends" $backend-list)
    (canon lift (core func $i "set-backends") (memory $memory) (realloc $realloc) string-encoding=utf8))
  (export "set-backends" (func $set-backends))

  ;; pick: a list<u32> comes in (realloc) and the option is read from memory (memory).
  (type $stats-list (list u32))
  (type $pick-result (option u32))
  (func $pick (param "conn" $connection) (param "stats" $stats-list) (result $pick-result)
    (canon lift (core func $i "pick") (memory $memory) (realloc $realloc)))
  (export "pick" (func $pick))

  ;; report: numbers only, so no options at all.
  (func $report (param "outcome" $connection-outcome)
    (canon lift (core func $i "report")))
  (export "report" (func $report))
)
