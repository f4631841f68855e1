// Read-only memory mapping of checkpoint files, and a WeightSource over the tensor list that
// lib/checkpoint.ts built from the safetensors headers. Tensors are converted straight from the mapping.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "model/engine.h"

namespace tfew {

class MappedFile {
 public:
  explicit MappedFile(const std::string& path);  // throws Io naming the file
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  int64_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  uint8_t* data_ = nullptr;
  int64_t size_ = 0;
};

// Runs `copy`, a plain copy or conversion out of a mapped file (nothing in it may own resources), so that a
// read past the file's end — the file truncated or replaced after it was mapped — throws Io naming `what`
// instead of killing the process with SIGBUS. A process-wide SIGBUS handler (installed on first use, passing
// every other SIGBUS to the previous disposition) jumps back to the guarded read of the faulting thread.
void guarded_read(const std::string& what, void (*copy)(void*), void* context);
template <typename F>
void read_mapped(const std::string& what, F&& copy) {
  using Fn = typename std::remove_reference<F>::type;
  guarded_read(what, [](void* f) { (*static_cast<Fn*>(f))(); }, &copy);
}

// Writes a temporary file, maps it, truncates it to 0 bytes and reads its first byte through read_mapped: the
// Io error a truncation during loading gives (the test of the guard). The file is removed.
void read_after_truncation_for_test();

struct TensorSpec {
  std::string name, file;
  int64_t offset = 0, byte_length = 0;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
};

DType parse_dtype(const std::string& s);  // "F64" | "F32" | "F16" | "BF16", else InvalidModel
int dtype_size(DType d);

class FileWeightSource : public WeightSource {
 public:
  explicit FileWeightSource(const std::vector<TensorSpec>& specs);
  TensorView get(const std::string& name, const std::vector<int64_t>& expected_shape) const override;
  bool has(const std::string& name) const override;

 private:
  std::map<std::string, TensorSpec> specs_;
  std::map<std::string, std::shared_ptr<MappedFile>> files_;
};

}  // namespace tfew
