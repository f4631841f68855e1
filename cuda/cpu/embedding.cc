// Token embedding lookup (the table is frozen, ids are not differentiable: no backward).
#include <cstring>

#include "cpu_ops.h"

namespace tfew {
namespace cpu {

void embedding_forward(const int32_t* ids, const float* table, float* out, int64_t n, int d) {
  for (int64_t t = 0; t < n; ++t) std::memcpy(out + t * d, table + static_cast<int64_t>(ids[t]) * d, sizeof(float) * d);
}

}  // namespace cpu
}  // namespace tfew
