# Bars: each target's result relative to HAProxy (> 1 = better than HAProxy), per scenario.
# For "lower is better" rows (latency, CPU, RSS) the ratio is HAProxy / target, so a taller bar is
# always the better result. Bars are cut at 4; every bar carries its value.
# Called by bench/run with -e "datafile='...'; outfile='...'".
set terminal pngcairo size 1200,560 font ",10"
set output outfile
set title "fulcrum bench: each target relative to HAProxy (higher is better; dashed line = HAProxy)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set grid ytics
set yrange [0:4.3]
set ylabel "x HAProxy"
set xtics rotate by -30 scale 0
set key top left
set arrow from graph 0, first 1 to graph 1, first 1 nohead dt 2 lw 2 lc rgb "#444444" front
cap(v) = v > 4 ? 4 : v
plot datafile using (cap($2)):xtic(1) title "direct (no proxy)" lc rgb "#9e9e9e", \
     '' using (cap($3)) title "fulcrum" lc rgb "#1f77b4", \
     '' using (cap($4)) title "nginx" lc rgb "#2ca02c", \
     '' using ($0 - 0.25):(cap($2) + 0.08):(sprintf("%.2f", $2)) with labels font ",8" notitle, \
     '' using ($0):(cap($3) + 0.08):(sprintf("%.2f", $3)) with labels font ",8" notitle, \
     '' using ($0 + 0.25):(cap($4) + 0.08):(sprintf("%.2f", $4)) with labels font ",8" notitle
