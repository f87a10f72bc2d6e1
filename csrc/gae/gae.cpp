// One row per task: the recursion runs backwards in time, so rows are the only
// parallelism. Compiled with -ffp-contract=off so float64 results equal the Python loop.
#include "gae/gae.h"

namespace fr::FR_ISA_NS {

template <class scalar_t>
static void gae_rows(const GaeParams& p, int64_t b0, int64_t b1) {
  using acc = acc_t<scalar_t>;
  const acc gamma = acc(p.gamma), gamma_lam = acc(p.gamma * p.lam);
  for (int64_t b = b0; b < b1; ++b) {
    const scalar_t* r = static_cast<const scalar_t*>(p.rewards) + b * p.T;   // (T,)
    const scalar_t* v = static_cast<const scalar_t*>(p.values) + b * p.T;    // (T,)
    const uint8_t* m = p.mask + b * p.T;                                     // (T,)
    scalar_t* adv = static_cast<scalar_t*>(p.advantages) + b * p.T;          // (T,)
    scalar_t* ret = static_cast<scalar_t*>(p.returns) + b * p.T;             // (T,)
    int64_t last = p.T - 1;  // V_{t+1} and A_{t+1} are 0 past the last response token
    while (last >= 0 && !m[last]) {
      adv[last] = from_acc<scalar_t>(acc(0));
      ret[last] = from_acc<scalar_t>(acc(0));
      --last;
    }
    acc next_value = 0, next_adv = 0;
    for (int64_t t = last; t >= 0; --t) {
      const acc vt = to_acc(v[t]);
      const acc delta = to_acc(r[t]) + gamma * next_value - vt;
      next_adv = delta + gamma_lam * next_adv;
      next_value = vt;
      adv[t] = from_acc<scalar_t>(m[t] ? next_adv : acc(0));
      ret[t] = from_acc<scalar_t>(m[t] ? next_adv + vt : acc(0));
    }
  }
}

void gae_cpu(const GaeParams& p) {
  // ~3 flops per element: below ~512k elements a chunk is cheaper than waking the thread pool,
  // which costs milliseconds when the other cores are busy.
  const int64_t grain = (int64_t(1) << 19) / (p.T > 0 ? p.T : 1) + 1;
  FR_DISPATCH_FLOAT(p.dtype, parallel_for(0, p.B, grain, [&](int64_t b0, int64_t b1) {
    gae_rows<scalar_t>(p, b0, b1);
  }));
}

}  // namespace fr::FR_ISA_NS
