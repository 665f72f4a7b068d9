/**
 * File handling of the Ascend 310 runner, kept free of MindSpore types so it builds and is tested on any host.
 *
 * File contract (the same as src/infer_files.py; preprocess.py writes the inputs, postprocess.py reads the
 * outputs):
 *   inputs   <input_dir>/image/<image_id>.bin        float32 (1, 3, H, W)   normalised RGB, zero padded
 *            <input_dir>/image_shape/<image_id>.bin  float32 (1, 4)         ori_h, ori_w, scale_h, scale_w
 *   outputs  <result_dir>/<image_id>_<i>.bin, one file per network output i, holding the raw bytes of the
 *            N rows (of K) whose `valid` flag (output 3) is set:
 *            0 boxes float32 (N, 4), 1 scores float32 (N), 2 labels int32 (N), 3 valid bool (N),
 *            4 masks float32 (N, 28, 28)
 */
#ifndef MASKRCNN_ASCEND310_INFER_INC_UTILS_H_
#define MASKRCNN_ASCEND310_INFER_INC_UTILS_H_

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace maskrcnn {

constexpr const char *kImageDir = "image";
constexpr const char *kImageShapeDir = "image_shape";
constexpr size_t kNumOutputs = 5;
constexpr size_t kValidOutput = 3;

struct Options {
  std::string model_path;          // .mindir, or .om converted from an AIR file by atc
  std::string input_dir;           // preprocess.py output
  std::string result_dir = "./result_files";
  uint32_t device_id = 0;
  std::string precision_mode;      // empty: the device default
};

// Parses --key=value arguments; throws std::runtime_error naming a bad or missing option.
Options ParseOptions(int argc, char **argv);

// Image ids that have an image_shape file, in numeric order; throws if one lacks its image file.
std::vector<std::string> ListImageIds(const std::string &input_dir);

std::string InputPath(const std::string &input_dir, const std::string &kind, const std::string &image_id);
std::string OutputPath(const std::string &result_dir, const std::string &image_id, size_t output_index);

std::vector<char> ReadFile(const std::string &path);

// Creates the directory (one level) unless it exists.
void EnsureDirectory(const std::string &path);

// Writes to <path>.tmp, then renames, so a reader never sees a partial file.
void WriteFileAtomic(const std::string &path, const std::vector<char> &data);

// Rows r with valid[r] != 0, concatenated; data holds `rows` rows of `row_bytes` bytes.
std::vector<char> KeepRows(const char *data, size_t rows, size_t row_bytes, const uint8_t *valid);

}  // namespace maskrcnn

#endif  // MASKRCNN_ASCEND310_INFER_INC_UTILS_H_
